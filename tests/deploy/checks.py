"""What the deployment tests check, as plain functions that return problems (so each test can also show
that a broken input is caught): container commands against the package, compose interpolation, the lock."""

from __future__ import annotations

import importlib.util
import re
import shlex
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
SECRETS = ("POSTGRES_PASSWORD", "REDIS_PASSWORD", "QDRANT_API_KEY")


def command_problems(argv: list[str]) -> list[str]:
    """Why a container command would not start with this package ([] when it would).

    `omniattr ...` is parsed by the CLI's own parser; `celery -A module ...` needs the module to exist and
    hold a Celery app, and its subcommand options are parsed by Celery's own click command; queues named
    with -Q must be queues the app declares; `python -c CODE` must compile.
    """
    if not argv:
        return ["empty command"]
    program, *args = argv
    if program == "omniattr":
        from omniattr.cli import build_parser

        try:
            build_parser().parse_args(args)
        except SystemExit:
            return [f"omniattr rejects {shlex.join(args)!r}"]
        return []
    if program == "celery":
        return _celery_problems(args)
    if program == "python" and args[:1] == ["-c"]:
        try:
            compile(args[1], "<healthcheck>", "exec")
        except SyntaxError as error:
            return [f"python -c does not compile: {error}"]
        return []
    return [f"unknown program {program!r} (expected omniattr, celery or python -c)"]


def _celery_problems(args: list[str]) -> list[str]:
    from celery import Celery
    from celery.bin.base import CLIContext
    from celery.bin.celery import celery as celery_cli

    if len(args) < 3 or args[0] not in ("-A", "--app"):
        return ["celery command must start with -A MODULE SUBCOMMAND"]
    module_name, subcommand, options = args[1], args[2], args[3:]
    if importlib.util.find_spec(module_name.split(":")[0]) is None:
        return [f"celery app module {module_name!r} is not in the package"]
    module = importlib.import_module(module_name.split(":")[0])
    app = getattr(module, module_name.split(":")[1] if ":" in module_name else "app", None)
    if not isinstance(app, Celery):
        return [f"{module_name} has no Celery app named app"]
    if subcommand not in celery_cli.commands:
        return [f"celery has no {subcommand!r} command"]
    try:
        context = celery_cli.commands[subcommand].make_context(
            subcommand, list(options), obj=CLIContext(app=app, no_color=True, workdir=None, quiet=True)
        )
    except Exception as error:  # noqa: BLE001 - click raises its own usage errors
        return [f"celery {subcommand} rejects {shlex.join(options)!r}: {error}"]
    queues = context.params.get("queues") or []
    declared = {queue.name for queue in app.conf.task_queues or []}
    unknown = sorted(set(queues) - declared)
    return [f"queues {unknown} are not declared by {module_name}"] if unknown else []


def shell_command(text: str) -> list[str]:
    """A CMD-SHELL healthcheck's first command as argv (the part before a pipe), with $$ unescaped."""
    return shlex.split(text.replace("$$", "$").split("|")[0])


# --- compose interpolation ------------------------------------------------------------------------------

_VARIABLE = re.compile(r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")


class MissingVariable(KeyError):
    """A ${NAME:?message} whose NAME is unset or empty."""


def interpolate(value: Any, env: Mapping[str, str]) -> Any:
    """Compose's variable interpolation ($$, ${X}, ${X:-default}, ${X-default}, ${X:?err}, ${X?err})."""
    if isinstance(value, dict):
        return {key: interpolate(item, env) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, env) for item in value]
    if not isinstance(value, str):
        return value

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, arg = match.group("name"), match.group("op"), match.group("arg")
        current = env.get(name)
        unset = current is None or (current == "" and op is not None and op.startswith(":"))
        if op in ("?", ":?") and unset:
            raise MissingVariable(f"{name}: {arg}")
        if op in ("-", ":-") and unset:
            return interpolate(arg, env)
        return current or ""

    return _VARIABLE.sub(replace, value)


def variables(text: str) -> dict[str, set[str]]:
    """Every ${NAME...} in a compose file: NAME -> the operators it is used with ('' for none)."""
    found: dict[str, set[str]] = {}
    for match in _VARIABLE.finditer(text):
        if match.group("name"):
            found.setdefault(match.group("name"), set()).add(match.group("op") or "")
    return found


def secret_problems(text: str) -> list[str]:
    """Secrets must be required (${NAME:?...}) everywhere a compose file uses them: never a default."""
    return [
        f"{name} is used as ${{{name}{op}...}}: secrets must be ${{{name}:?...}}"
        for name, ops in variables(text).items()
        if name in SECRETS
        for op in sorted(ops)
        if op != ":?"
    ]


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines of a dotenv file (comments and blank lines skipped)."""
    values = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


# --- the dependency lock --------------------------------------------------------------------------------


def project_requirements() -> list[Requirement]:
    """The project's runtime requirements from pyproject.toml."""
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return [Requirement(text) for text in data["project"]["dependencies"]]


def lock_problems(lock_lines: Iterable[str], requirements: Iterable[Requirement], *, skip: set[str]) -> list[str]:
    """A lock must pin (==) every requirement, except `skip`, to a version its specifier allows."""
    pins: dict[str, str] = {}
    problems = []
    for line in lock_lines:
        spec = line.split("#")[0].strip()
        if not spec:
            continue
        requirement = Requirement(spec)
        specifiers = list(requirement.specifier)
        if len(specifiers) != 1 or specifiers[0].operator != "==":
            problems.append(f"{spec!r} is not pinned with ==")
            continue
        pins[canonicalize_name(requirement.name)] = specifiers[0].version
    for requirement in requirements:
        name = canonicalize_name(requirement.name)
        if name in skip:
            continue
        if name not in pins:
            problems.append(f"{requirement.name} is not in the lock")
        elif not requirement.specifier.contains(pins[name], prereleases=True):
            problems.append(f"{requirement.name}=={pins[name]} does not satisfy pyproject's {requirement}")
    return problems
