"""Write docker/requirements.txt: every runtime dependency of omniattr pinned to the version installed here.

Run `.venv/bin/python scripts/lock_requirements.py` after changing dependencies in pyproject.toml (and
installing them with `make setup`). The lock is the closure of the project's own requirements (no `dev`
extra), resolved against this venv; torch is left out because each image installs its own build of it
(CPU wheel or CUDA wheel), pinned in the Dockerfile. A requirement that only applies under an environment
marker (a Python version, a platform) keeps that marker, so the lock also installs on the CUDA image's
Python.
"""

from __future__ import annotations

import argparse
import sys
from importlib import metadata
from pathlib import Path

from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

PROJECT = "omniattr"
INSTALLED_SEPARATELY = {"torch"}  # each Dockerfile pins its own torch build
LOCK_PATH = Path(__file__).resolve().parent.parent / "docker" / "requirements.txt"
HEADER = """\
# Runtime dependencies of omniattr pinned for the Docker images (generated; do not edit by hand).
# Regenerate: .venv/bin/python scripts/lock_requirements.py   (tests/deploy checks it matches pyproject.toml)
# torch is not here: docker/Dockerfile installs the CPU wheel, docker/Dockerfile.cuda the CUDA one.
"""


def _applies(requirement: Requirement, extras: set[str]) -> bool:
    """Whether a requirement is part of this install: its extra was asked for (markers other than extra hold
    for the lock's own line, see _platform_marker)."""
    if requirement.marker is None:
        return True
    return any(requirement.marker.evaluate({"extra": extra}) for extra in extras or {""}) or (
        "extra" not in str(requirement.marker) and requirement.marker.evaluate({"extra": ""})
    )


def _platform_marker(requirement: Requirement) -> str | None:
    """The requirement's marker when it does not name an extra (kept on the lock line), else None."""
    if requirement.marker is None or "extra" in str(requirement.marker):
        return None
    return str(requirement.marker)


def resolve_closure(project: str = PROJECT) -> dict[str, tuple[str, set[str]]]:
    """canonical name -> (installed version, markers under which it is needed; empty set = always)."""
    found: dict[str, tuple[str, set[str]]] = {}
    pending: list[tuple[Requirement, str | None]] = [(Requirement(project), None)]
    seen: set[tuple[str, frozenset[str], str | None]] = set()
    while pending:
        requirement, marker = pending.pop()
        name = canonicalize_name(requirement.name)
        key = (name, frozenset(requirement.extras), marker)
        if key in seen:
            continue
        seen.add(key)
        try:
            distribution = metadata.distribution(requirement.name)
        except metadata.PackageNotFoundError:
            if marker is not None and not Marker(marker).evaluate():
                continue  # needed only elsewhere (another Python or platform): not installed here
            raise SystemExit(f"{requirement.name} is required but not installed; run `make setup` first") from None
        version, markers = found.get(name, (distribution.version, None))
        if markers is None:
            markers = {marker} if marker else set()
        elif not marker or not markers:
            markers = set()  # needed unconditionally on some path
        else:
            markers.add(marker)
        found[name] = (version, markers)
        for text in distribution.requires or []:
            child = Requirement(text)
            if _applies(child, set(requirement.extras)):
                pending.append((child, _platform_marker(child) or marker))
    found.pop(canonicalize_name(project))
    return found


def render_lock(closure: dict[str, tuple[str, set[str]]]) -> str:
    """The lock file's text: one `name==version` line per package, sorted, with its marker when it has one."""
    lines = [HEADER]
    for name in sorted(closure):
        if name in INSTALLED_SEPARATELY:
            continue
        version, markers = closure[name]
        marker = " or ".join(f"({m})" for m in sorted(markers)) if len(markers) > 1 else next(iter(markers), "")
        lines.append(f"{name}=={version}" + (f" ; {marker}" if marker else "") + "\n")
    return "".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Write (or with --check, compare) docker/requirements.txt."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=LOCK_PATH)
    parser.add_argument("--check", action="store_true", help="exit 1 when the file differs from a fresh lock")
    args = parser.parse_args(argv)
    text = render_lock(resolve_closure())
    if args.check:
        current = args.out.read_text() if args.out.exists() else ""
        if current != text:
            print(f"{args.out} is out of date; run scripts/lock_requirements.py", file=sys.stderr)
            return 1
        return 0
    args.out.write_text(text)
    print(f"wrote {args.out} ({text.count(chr(10)) - HEADER.count(chr(10))} packages)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
