"""API fixtures: the real app on the embedded profile (SQLite + Qdrant Edge + in-process worker)."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from api.app import create_app
from omniattr.settings import Settings
from tests.indexer.conftest import tiny_encoder_dir  # noqa: F401 - shared session fixture


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(env: dict[str, str], cwd) -> Iterator[str]:
    """`omniattr up` (the installed script) on a free loopback port; yields its URL, stops it after."""
    port = free_port()
    process = subprocess.Popen(
        [str(Path(sys.executable).with_name("omniattr")), "up"],
        cwd=cwd,
        env={**env, "OMNIATTR_API_PORT": str(port)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/api/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        else:
            process.kill()
            pytest.fail("server did not start: " + process.stderr.read1().decode())
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def png(seed: int, size: int = 48) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def wait_for_job(client: TestClient, job_id: int, timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/api/jobs/{job_id}").json()
        if job["status"] in ("done", "failed", "cancelled"):
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not finish: {job}")


def make_settings(tmp_path, encoder_dir, **overrides) -> Settings:
    (tmp_path / "photos").mkdir(parents=True, exist_ok=True)
    values = dict(
        data_dir=tmp_path / "data",
        encoder_path=encoder_dir,
        device="cpu",
        allowed_roots=[tmp_path / "photos"],
        index_batch_size=8,
    )
    values.update(overrides)
    return Settings(_env_file=None, **values)


@pytest.fixture
def client(tmp_path, tiny_encoder_dir, monkeypatch):  # noqa: F811
    for key in [k for k in __import__("os").environ if k.startswith("OMNIATTR_")]:
        monkeypatch.delenv(key)
    from store.database import upgrade_database

    settings = make_settings(tmp_path, tiny_encoder_dir)
    upgrade_database(settings.resolved_database_url)
    with TestClient(create_app(settings)) as test_client:
        yield test_client


@pytest.fixture(scope="session")
def generator_dir(tmp_path_factory):
    from generator_plugin import AttributePipeline
    from generator_plugin.testing import tiny_generator, tiny_text_encoders

    root = tmp_path_factory.mktemp("generator")
    base = tiny_generator(seed=0, token_dim=None)
    AttributePipeline(base.transformer, base.vae, base.scheduler, **tiny_text_encoders(seed=0)).save_pretrained(root)
    tiny_generator(seed=3, token_dim=32).attribute_adapter.save_pretrained(root / "attribute_adapter")
    return root


@pytest.fixture
def embedded_env(tmp_path, tiny_encoder_dir, monkeypatch):  # noqa: F811
    """The embedded profile for CLI tests: no OMNIATTR_* from outside, the tiny encoder, 6 photos to ingest."""
    for key in [k for k in os.environ if k.startswith("OMNIATTR_")]:
        monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OMNIATTR_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("OMNIATTR_ENCODER_PATH", str(tiny_encoder_dir))
    monkeypatch.setenv("OMNIATTR_DEVICE", "cpu")
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(6):
        (photos / f"{i}.png").write_bytes(png(i))
    return photos
