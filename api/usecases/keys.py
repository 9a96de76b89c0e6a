"""API keys, as the request check sees them."""

from __future__ import annotations

from api.usecases.context import Services
from store import metadata


def api_key_is_live(services: Services, *, plaintext: str) -> bool:
    """Whether `plaintext` is a known, unrevoked API key (its use is recorded)."""
    with services.session_factory.begin() as session:
        return metadata.verify_api_key(session, plaintext=plaintext) is not None
