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
