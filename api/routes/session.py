"""The page's media session: the API key as an HttpOnly cookie, so <img> URLs never carry it."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response, status

from api.deps import KEY_COOKIE

router = APIRouter(prefix="/api/session", tags=["session"])


@router.post("", status_code=status.HTTP_204_NO_CONTENT)
def start_session(request: Request, response: Response) -> None:
    """Store the X-API-Key just checked as an HttpOnly, SameSite=Strict cookie that media GETs accept."""
    key = request.headers.get("X-API-Key")
    if key:  # keys off: nothing to store
        response.set_cookie(
            KEY_COOKIE, key, httponly=True, samesite="strict", secure=request.url.scheme == "https", path="/api"
        )


@router.delete("", status_code=status.HTTP_204_NO_CONTENT)
def end_session(response: Response) -> None:
    """Forget the cookie."""
    response.delete_cookie(KEY_COOKIE, path="/api")
