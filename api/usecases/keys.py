"""API keys: the request check, and create / list / revoke for the CLI (keys are stored hashed)."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.orm import Session, sessionmaker

from api.usecases.context import Services
from store import metadata


@dataclass(frozen=True)
class KeyInfo:
    """An API key as its owner sees it: never the key itself, only its first characters."""

    id: int
    name: str
    prefix: str
    revoked: bool


def api_key_is_live(services: Services, *, plaintext: str) -> bool:
    """Whether `plaintext` is a known, unrevoked API key (its use is recorded)."""
    with services.session_factory.begin() as session:
        return metadata.verify_api_key(session, plaintext=plaintext) is not None


def create_api_key(session_factory: sessionmaker[Session], *, name: str) -> tuple[KeyInfo, str]:
    """A new key and its plaintext, which exists only in this return value."""
    with session_factory.begin() as session:
        key, plaintext = metadata.create_api_key(session, name=name)
        return KeyInfo(key.id, key.name, key.prefix, revoked=False), plaintext


def list_api_keys(session_factory: sessionmaker[Session]) -> list[KeyInfo]:
    """Every key, revoked ones included."""
    with session_factory.begin() as session:
        return [
            KeyInfo(key.id, key.name, key.prefix, revoked=key.revoked_at is not None)
            for key in metadata.list_api_keys(session)
        ]


def revoke_api_key(session_factory: sessionmaker[Session], *, key_id: int) -> None:
    """Revoke a key by id; an unknown id is a NotFoundError."""
    with session_factory.begin() as session:
        metadata.revoke_api_key(session, key_id=key_id)
