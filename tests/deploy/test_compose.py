"""docker-compose*.yml: valid against the Compose Specification's JSON schema (the copy that the PyPI package
check-jsonschema ships), commands that exist in this package, required secrets, and the service wiring.

No Docker engine runs here, so nothing is started: these checks are what can be known without one.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest
import yaml
from jsonschema import Draft202012Validator

from omniattr.settings import Profile, Settings
from tests.deploy.checks import (
    ROOT,
    SECRETS,
    MissingVariable,
    command_problems,
    interpolate,
    read_env_file,
    secret_problems,
    shell_command,
    variables,
)

COMPOSE_FILES = sorted(ROOT.glob("docker-compose*.yml"))
MAIN = ROOT / "docker-compose.yml"
OMNIATTR_SERVICES = ("migrate", "api", "worker", "worker-gpu")
DUMMY_SECRETS = {name: f"test-{name.lower()}" for name in SECRETS}


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


@pytest.fixture(scope="module")
def compose_schema() -> Draft202012Validator:
    """The Compose Specification schema vendored by check-jsonschema (Apache-2.0, with its license file)."""
    try:
        text = resources.files("check_jsonschema.builtin_schemas.vendor").joinpath("compose-spec.json").read_text()
    except ModuleNotFoundError:
        pytest.fail("check-jsonschema is not installed: `make setup` installs it (dev extra)")
    schema = json.loads(text)
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


def schema_errors(validator: Draft202012Validator, document: dict) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(document)]


def test_the_compose_files_are_found():
    assert MAIN in COMPOSE_FILES
    assert {p.name for p in COMPOSE_FILES} >= {"docker-compose.workers.yml", "docker-compose.qdrant-cluster.yml"}


@pytest.mark.slow
@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_compose_file_is_valid_against_the_compose_specification(path, compose_schema):
    assert schema_errors(compose_schema, load(path)) == []


@pytest.mark.slow
def test_check_jsonschema_cli_accepts_the_compose_files():
    """The same check as a user would run it: check-jsonschema --builtin-schema vendor.compose-spec."""
    executable = shutil.which("check-jsonschema", path=str(Path(sys.executable).parent))
    assert executable, "check-jsonschema is not installed: `make setup` installs it (dev extra)"
    result = subprocess.run(
        [executable, "--builtin-schema", "vendor.compose-spec", *map(str, COMPOSE_FILES)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    "mutate",
    [
        lambda c: c["services"]["api"].__setitem__("ports", 8000),  # ports must be a list
        lambda c: c["services"]["api"].__setitem__("restart_policy", "always"),  # no such service key
        lambda c: c["services"]["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"][0].pop("capabilities"),
        lambda c: c["services"]["postgres"]["healthcheck"].__setitem__("interval", ["5s"]),
        lambda c: c.__setitem__("servics", c.pop("services")),
    ],
    ids=["ports-not-a-list", "unknown-key", "device-without-capabilities", "interval-not-a-string", "misspelt-top"],
)
def test_schema_rejects_a_broken_compose_file(mutate, compose_schema):
    broken = copy.deepcopy(load(MAIN))
    mutate(broken)
    assert schema_errors(compose_schema, broken), "the schema accepted a broken compose file"


def _commands(path: Path):
    """(service, argv) for every omniattr container command and healthcheck in a compose file."""
    services = load(path).get("services", {})
    for name, service in services.items():
        if not str(service.get("image", "")).startswith("omniattr/"):
            continue
        if "command" in service:
            yield name, interpolate(service["command"], {"GPU_ID": "0"})
        test = service.get("healthcheck", {}).get("test")
        if test and test[0] == "CMD":
            yield f"{name} healthcheck", test[1:]
        elif test and test[0] == "CMD-SHELL":
            yield f"{name} healthcheck", shell_command(test[1])


@pytest.mark.slow
@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_every_service_command_exists_in_the_package(path):
    problems = {name: command_problems(argv) for name, argv in _commands(path)}
    if path == MAIN:
        assert set(OMNIATTR_SERVICES) | {"api healthcheck", "worker healthcheck"} <= problems.keys()
    assert {name: found for name, found in problems.items() if found} == {}


def test_command_check_catches_a_wrong_command():
    assert command_problems(["omniattr", "serve"])  # no such subcommand
    assert command_problems(["omniattr", "up", "--bind", "0.0.0.0"])  # no such option
    assert command_problems(["celery", "-A", "indexer.no_such_module", "worker"])
    assert command_problems(["celery", "-A", "indexer.celery_app", "worker", "-Q", "ingest,thumbnails"])
    assert command_problems(["celery", "-A", "indexer.celery_app", "worker", "--concurency", "1"])
    assert command_problems(["gunicorn", "api.app:app"])


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_secrets_are_required_never_defaulted(path):
    assert secret_problems(path.read_text()) == []


def test_secret_check_catches_a_default():
    assert secret_problems("password: ${POSTGRES_PASSWORD:-postgres}")
    assert secret_problems("url: redis://:${REDIS_PASSWORD}@redis")
    assert not secret_problems("key: ${QDRANT_API_KEY:?set it}")


def test_env_example_names_every_required_variable_and_no_omniattr_setting():
    """A user copies .env.example to .env: it must list what compose requires. Its names must not start with
    OMNIATTR_ (settings read .env in the cwd, so such a name would change what a local `omniattr` does)."""
    example = read_env_file(ROOT / ".env.example")
    required = {name for path in COMPOSE_FILES for name, ops in variables(path.read_text()).items() if ":?" in ops}
    scale_out = {"HUB_ADDRESS", "MEDIA_DIR"}  # required only by the multi-host files, documented commented-out
    assert required - scale_out <= example.keys()
    text = (ROOT / ".env.example").read_text()
    assert all(f"\n# {name}=" in text for name in scale_out)
    assert [name for name in example if name.startswith("OMNIATTR_")] == []
    assert example["COMPOSE_PROFILES"] == "cpu"


def test_compose_refuses_to_start_without_the_secrets():
    config = load(MAIN)
    with pytest.raises(MissingVariable, match="POSTGRES_PASSWORD"):
        interpolate(config, {})
    assert interpolate(config, DUMMY_SECRETS)  # and resolves once they are set


def test_services_wiring():
    """Healthchecked backing services on volumes, migration before the API and workers, media and models
    mounted, the API on 8000, the GPU worker reserving NVIDIA GPUs with a configurable count."""
    config = interpolate(load(MAIN), {**read_env_file(ROOT / ".env.example"), **DUMMY_SECRETS})
    services = config["services"]
    assert set(services) >= {"postgres", "redis", "qdrant", "migrate", "api", "worker", "worker-gpu"}
    for name in ("postgres", "redis", "qdrant"):
        image = services[name]["image"]
        assert ":" in image and not image.endswith(":latest"), f"{name} image is not pinned: {image}"
        assert services[name]["healthcheck"]["test"], name
        assert any(volume.split(":")[0] in config["volumes"] for volume in services[name]["volumes"]), name
    assert services["qdrant"]["image"].startswith("qdrant/qdrant:v")
    assert services["migrate"]["command"] == ["omniattr", "migrate"]
    for name in ("api", "worker", "worker-gpu"):
        assert services[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully", name
        mounts = {volume.split(":")[1] for volume in services[name]["volumes"]}
        assert {"/data", "/models"} <= mounts, name
    assert any(str(port).endswith(":8000") for port in services["api"]["ports"])
    assert services["worker"]["profiles"] == ["cpu"] and services["worker-gpu"]["profiles"] == ["gpu"]
    (device,) = services["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert (
        "${WORKER_GPUS"
        in load(MAIN)["services"]["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"][0]["count"]
    )


@pytest.mark.parametrize("service", OMNIATTR_SERVICES)
def test_container_environment_makes_valid_server_settings(service, monkeypatch, tmp_path):
    """The environment compose gives each omniattr container (with .env.example's values) is a complete
    server-profile configuration for omniattr.settings.Settings."""
    monkeypatch.chdir(tmp_path)  # no stray .env
    for name in [n for n in os.environ if n.startswith("OMNIATTR_")]:
        monkeypatch.delenv(name)
    config = interpolate(load(MAIN), {**read_env_file(ROOT / ".env.example"), **DUMMY_SECRETS})
    for name, value in config["services"][service]["environment"].items():
        monkeypatch.setenv(name, str(value))
    settings = Settings()
    assert settings.profile is Profile.server
    assert settings.database_url.startswith("postgresql+psycopg://omniattr:test-postgres_password@postgres:5432/")
    assert settings.qdrant_url == "http://qdrant:6333" and settings.qdrant_api_key == "test-qdrant_api_key"
    assert settings.broker_url == "redis://:test-redis_password@redis:6379/0"
    assert str(settings.encoder_path).startswith("/models/")
    assert settings.api_keys_required
