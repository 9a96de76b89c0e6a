"""Settings profiles and the CLI entry point, run as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError
from sqlalchemy import inspect

from omniattr.settings import Profile, Settings
from store.database import head_revision, make_engine

CLI = [sys.executable, "-m", "omniattr.cli"]
ROOT = Path(__file__).resolve().parents[1]


def clean_env(**overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMNIATTR_")}
    env.update(overrides)
    return env


def test_embedded_is_the_default_and_needs_no_servers(tmp_path, monkeypatch):
    for key in [k for k in os.environ if k.startswith("OMNIATTR_")]:
        monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)  # no stray .env file
    settings = Settings(data_dir=tmp_path)
    assert settings.profile is Profile.embedded
    assert settings.resolved_database_url == f"sqlite:///{(tmp_path / 'omniattr.sqlite3').resolve()}"
    assert settings.vectors_dir == tmp_path / "vectors"
    assert settings.api_keys_required is False


def test_server_profile_names_every_missing_setting(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OMNIATTR_PROFILE", "server")
    monkeypatch.setenv("OMNIATTR_QDRANT_URL", "http://127.0.0.1:6333")
    with pytest.raises(ValidationError, match="OMNIATTR_DATABASE_URL, OMNIATTR_BROKER_URL"):
        Settings()
    monkeypatch.setenv("OMNIATTR_DATABASE_URL", "postgresql+psycopg://u@h/db")
    monkeypatch.setenv("OMNIATTR_BROKER_URL", "redis://127.0.0.1:6379/0")
    settings = Settings()
    assert settings.api_keys_required is True
    assert settings.resolved_database_url == "postgresql+psycopg://u@h/db"


@pytest.mark.slow
def test_cli_migrate_creates_the_embedded_database(tmp_path):
    result = subprocess.run(
        [*CLI, "migrate"],
        cwd=ROOT,
        env=clean_env(OMNIATTR_DATA_DIR=str(tmp_path)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    engine = make_engine(f"sqlite:///{tmp_path / 'omniattr.sqlite3'}")
    try:
        assert "images" in inspect(engine).get_table_names()
        with engine.connect() as connection:
            revision = connection.exec_driver_sql("SELECT version_num FROM alembic_version").scalar()
        assert revision == head_revision()
    finally:
        engine.dispose()


@pytest.mark.slow
def test_cli_reports_bad_settings_in_one_line(tmp_path):
    result = subprocess.run(
        [*CLI, "settings"],
        cwd=tmp_path,
        env=clean_env(OMNIATTR_PROFILE="server", PYTHONPATH=str(ROOT)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "server profile needs OMNIATTR_DATABASE_URL" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_cli_settings_masks_passwords(tmp_path):
    env = clean_env(
        OMNIATTR_PROFILE="server",
        OMNIATTR_DATABASE_URL="postgresql+psycopg://app:s3cret@db/omni",
        OMNIATTR_QDRANT_URL="http://q:6333",
        OMNIATTR_QDRANT_API_KEY="topsecret",
        OMNIATTR_BROKER_URL="redis://r:6379/0",
        PYTHONPATH=str(ROOT),
    )
    result = subprocess.run([*CLI, "settings"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "s3cret" not in result.stdout and "topsecret" not in result.stdout
    assert "postgresql+psycopg://app:***@db/omni" in result.stdout


@pytest.fixture(scope="module")
def saved_tiny_generator(tmp_path_factory) -> Path:
    """A tiny real generator saved the way a shipped one is (diffusers layout, attribute_adapter/)."""
    from generator_plugin.testing import tiny_generator

    root = tmp_path_factory.mktemp("starter") / "generator"
    tiny_generator(seed=0).save_pretrained(root)
    return root


def test_unset_generator_path_resolves_to_the_shipped_generator(saved_tiny_generator, tmp_path, monkeypatch):
    """Like the encoder: an unset OMNIATTR_GENERATOR_PATH uses models/starter/generator when it is there, and
    load_generator reads what the rule points at."""
    from generator_plugin.plugins import load_generator

    for key in [k for k in os.environ if k.startswith("OMNIATTR_")]:
        monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)  # no stray .env file
    monkeypatch.setattr("omniattr.settings.SHIPPED_GENERATOR_PATH", saved_tiny_generator)
    settings = Settings()
    assert settings.generator_path is None and settings.resolved_generator_path == saved_tiny_generator
    assert load_generator("flux", settings.resolved_generator_path).attribute_adapter is not None

    # A configured path wins over the shipped one.
    elsewhere = tmp_path / "my-generator"
    assert Settings(generator_path=elsewhere).resolved_generator_path == elsewhere

    # The off switch wins over both, from the environment as a user sets it.
    monkeypatch.setenv("OMNIATTR_GENERATIONS_ENABLED", "false")
    assert Settings().resolved_generator_path is None
    assert Settings(generator_path=elsewhere).resolved_generator_path is None


def test_generations_are_off_without_a_shipped_generator(tmp_path, monkeypatch):
    """An installed wheel (no models/ folder), or a folder without model_index.json: no generator, same as before."""
    for key in [k for k in os.environ if k.startswith("OMNIATTR_")]:
        monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("omniattr.settings.SHIPPED_GENERATOR_PATH", tmp_path / "no-models" / "generator")
    assert Settings().resolved_generator_path is None
    half = tmp_path / "half" / "generator"
    (half / "transformer").mkdir(parents=True)  # a copy that never finished: no model_index.json
    monkeypatch.setattr("omniattr.settings.SHIPPED_GENERATOR_PATH", half)
    assert Settings().resolved_generator_path is None
