"""The `omniattr` command line. An entry point: it reads settings and passes plain values down."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from pydantic import ValidationError

from omniattr import __version__
from omniattr.settings import Settings
from store.database import upgrade_database
from store.errors import StoreError


def _load_settings() -> Settings:
    try:
        return Settings()
    except ValidationError as error:
        messages = "; ".join(e["msg"].removeprefix("Value error, ") for e in error.errors())
        raise SystemExit(f"omniattr: bad settings: {messages}") from None


def cmd_migrate(args: argparse.Namespace) -> int:
    """Bring the metadata database to the newest schema."""
    settings = _load_settings()
    upgrade_database(settings.resolved_database_url, revision=args.revision)
    print(f"database at {args.revision}: {settings.resolved_database_url.split('@')[-1]}")
    return 0


def cmd_settings(args: argparse.Namespace) -> int:
    """Print the resolved settings (secrets masked)."""
    settings = _load_settings()
    shown = settings.model_dump(mode="json")
    for secret in ("qdrant_api_key",):
        if shown.get(secret):
            shown[secret] = "***"
    for url in ("database_url", "broker_url", "result_backend_url"):
        if shown.get(url) and "@" in shown[url] and ":" in shown[url].split("@")[0].split("//")[-1]:
            scheme, rest = shown[url].split("//", 1)
            user = rest.split("@")[0].split(":")[0]
            shown[url] = f"{scheme}//{user}:***@{rest.split('@', 1)[1]}"
    shown["resolved_database_url"] = settings.resolved_database_url if not settings.database_url else "(as above)"
    print(json.dumps(shown, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="omniattr", description="Search image collections by one visual attribute; generate images with it."
    )
    parser.add_argument("--version", action="version", version=f"omniattr {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    migrate = commands.add_parser("migrate", help=cmd_migrate.__doc__)
    migrate.add_argument("--revision", default="head", help="target schema revision (default: head)")
    migrate.set_defaults(run=cmd_migrate)

    show = commands.add_parser("settings", help=cmd_settings.__doc__)
    show.set_defaults(run=cmd_settings)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one `omniattr` command; store errors become a one-line message and exit code 2."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except StoreError as error:
        print(f"omniattr: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
