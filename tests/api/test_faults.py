"""Faults the API must answer with clear JSON instead of 500s or a frozen server (issue 16, items 5 and 6).

Disk full: a real, small tmpfs mounted on the media directory (the tests run as root in CI; where mounting is
refused, the reserve test sets the reserve above the free space instead, and the ENOSPC test is skipped).
Database faults: a real PostgreSQL behind a TCP proxy the test controls ("stopped" = the proxy closes every
connection and refuses new ones) and a table lock held from another connection ("hung").
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from api.app import create_app
from omniattr.testing import create_throwaway_postgres, drop_throwaway_postgres
from store.database import upgrade_database
from tests.api.conftest import free_port, make_settings, png, wait_for_job


@pytest.fixture
def clean_env(monkeypatch):
    for key in [k for k in os.environ if k.startswith("OMNIATTR_")]:
        monkeypatch.delenv(key)


@pytest.fixture
def small_disk(tmp_path) -> Iterator[tuple[Path, bool]]:
    """(media dir, mounted): a 1 MiB tmpfs on DATA_DIR/media when mounting works, else a plain directory."""
    media = tmp_path / "data" / "media"
    media.mkdir(parents=True)
    mounted = (
        shutil.which("mount") is not None
        and subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(media)], capture_output=True, check=False
        ).returncode
        == 0
    )
    try:
        yield media, mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(media)], check=False)


def temporary_files(media: Path) -> list[Path]:
    return list(media.rglob(".tmp-*"))


def upload_until_refused(client: TestClient, collection_id: int) -> httpx.Response:
    """Upload 64x64 noise images (~12 KB each) one at a time until the API refuses one."""
    for i in range(400):
        response = client.post(
            f"/api/collections/{collection_id}/images", files=[("files", (f"{i}.png", png(i, size=64), "image/png"))]
        )
        if response.status_code != 200:
            return response
    raise AssertionError("400 uploads fitted on a 1 MiB disk")


@pytest.mark.slow
def test_disk_reserve_refuses_uploads_with_507(tmp_path, tiny_encoder_dir, small_disk, clean_env):
    media, mounted = small_disk
    free_mb = shutil.disk_usage(media).free // 2**20
    reserve_mb = 1 if mounted else free_mb + 1024  # on the tmpfs: most of it; elsewhere: more than is free
    settings = make_settings(tmp_path, tiny_encoder_dir, disk_reserve_mb=reserve_mb)
    upgrade_database(settings.resolved_database_url)
    with TestClient(create_app(settings)) as client:
        collection_id = client.post("/api/collections", json={"name": "full"}).json()["id"]
        response = upload_until_refused(client, collection_id)
        assert response.status_code == 507, response.text
        detail = response.json()["detail"]
        assert "OMNIATTR_DISK_RESERVE_MB" in detail and "Free space" in detail
        assert client.get("/api/health").status_code == 200
        # nothing half-stored: every image the collection lists has its files
        for image in client.get(f"/api/collections/{collection_id}/images").json()["data"]:
            assert client.get(image["thumbnail_url"]).status_code == 200
    assert temporary_files(media) == []


@pytest.mark.slow
def test_disk_full_mid_write_gives_507_and_leaves_no_temporary_files(tmp_path, tiny_encoder_dir, small_disk, clean_env):
    media, mounted = small_disk
    if not mounted:
        pytest.skip("mounting a tmpfs needs root; the reserve test covers the 507 without a real full disk")
    settings = make_settings(tmp_path, tiny_encoder_dir, disk_reserve_mb=0)  # no reserve: the disk fills up
    upgrade_database(settings.resolved_database_url)
    with TestClient(create_app(settings)) as client:
        collection_id = client.post("/api/collections", json={"name": "full"}).json()["id"]
        response = upload_until_refused(client, collection_id)
        assert response.status_code == 507, response.text
        assert "not enough disk space" in response.json()["detail"]
        assert client.get("/api/health").status_code == 200
    assert temporary_files(media) == []


def more_than_free_mb(path: Path) -> int:
    """A reserve the disk of `path` cannot keep: no disk is filled, the reserve is set beyond its free space."""
    return shutil.disk_usage(path).free // 2**20 + 1024


@pytest.mark.slow
def test_disk_reserve_refuses_database_writes_with_507(tmp_path, tiny_encoder_dir, clean_env):
    """The SQLite file's disk is checked before the use cases that commit rows by the batch: planning an index
    job, ingesting a directory, uploading (here the media check answers first: same disk)."""
    settings = make_settings(tmp_path, tiny_encoder_dir, disk_reserve_mb=0)
    upgrade_database(settings.resolved_database_url)
    with TestClient(create_app(settings)) as client:
        collection_id = client.post("/api/collections", json={"name": "full"}).json()["id"]
        files = [("files", (f"{i}.png", png(i), "image/png")) for i in range(3)]
        assert client.post(f"/api/collections/{collection_id}/images", files=files).status_code == 200
    full = settings.model_copy(update={"disk_reserve_mb": more_than_free_mb(tmp_path)})
    with TestClient(create_app(full)) as client:
        for path, body in [
            (f"/api/collections/{collection_id}/attributes", {"attributes": ["lighting"]}),
            (f"/api/collections/{collection_id}/ingest", {"path": str(tmp_path / "photos")}),
        ]:
            response = client.post(path, json=body)
            assert response.status_code == 507, response.text
            assert "metadata database" in response.json()["detail"], response.text
            assert "OMNIATTR_DISK_RESERVE_MB" in response.json()["detail"]
        assert client.get(f"/api/jobs?collection_id={collection_id}").json()["data"] == []  # nothing planned
        assert client.get("/api/health").status_code == 200


@pytest.mark.slow
def test_disk_reserve_fails_an_index_shard_with_a_message_and_the_worker_lives(tmp_path, tiny_encoder_dir, clean_env):
    """A job planned while there was room, run once the disk is down to the reserve: the shard's vector write
    is refused before Qdrant Edge touches its memory-mapped segments (a SIGBUS on a full disk), the job fails
    with the reason, and the worker takes the next job."""
    from indexer.work import plan_index_attributes

    settings = make_settings(tmp_path, tiny_encoder_dir, disk_reserve_mb=0)
    upgrade_database(settings.resolved_database_url)
    with TestClient(create_app(settings)) as client:
        collection_id = client.post("/api/collections", json={"name": "full"}).json()["id"]
        files = [("files", (f"{i}.png", png(i), "image/png")) for i in range(3)]
        assert client.post(f"/api/collections/{collection_id}/images", files=files).status_code == 200
        services = client.app.state.services
        with services.session_factory.begin() as session:  # planned and committed; runs at the next start
            plan = plan_index_attributes(
                session,
                collection_id=collection_id,
                attribute_texts=["lighting"],
                encoder_model_id=services.encoder_model_id,
            )
    full = settings.model_copy(update={"disk_reserve_mb": more_than_free_mb(tmp_path)})
    with TestClient(create_app(full)) as client:
        job = wait_for_job(client, plan.job_id, timeout=120)
        assert job["status"] == "failed", job
        assert "not enough disk space for the vector index" in job["error"], job
        services = client.app.state.services
        assert services.vectors.list_encoder_versions() == [] or (
            services.vectors.count(encoder_version=services.encoder_info.version) == 0
        )
        health = client.get("/api/health")
        assert health.status_code == 200 and health.json()["worker"] == "ok", health.text


@pytest.mark.slow
@pytest.mark.parametrize("profile", ["embedded", "server"])
def test_stale_temporary_files_are_swept_at_start_up(tmp_path, tiny_encoder_dir, clean_env, profile):
    """Embedded, the process holds the data directory's lock, so every temporary file is a dead writer's (even
    one killed a second ago); with a broker, a fresh one may be a Celery worker's write in progress and stays."""
    broker = {} if profile == "embedded" else {"broker_url": f"redis://127.0.0.1:{free_port()}/0"}  # down: unused
    settings = make_settings(tmp_path, tiny_encoder_dir, **broker)
    folder = settings.media_dir / "originals" / "ab"
    folder.mkdir(parents=True)
    stale, fresh = folder / ".tmp-stale", folder / ".tmp-fresh"  # left by a killed writer / just now
    stale.write_bytes(b"x" * 100)
    fresh.write_bytes(b"x" * 100)
    an_hour_ago = time.time() - 3600
    os.utime(stale, (an_hour_ago, an_hour_ago))
    upgrade_database(settings.resolved_database_url)
    with TestClient(create_app(settings)):
        pass
    assert not stale.exists()
    assert fresh.exists() == (profile == "server")


# --- database faults --------------------------------------------------------------------------------------


class TcpProxy:
    """Forwards 127.0.0.1:port to a target; `stop()` closes every connection and refuses new ones."""

    def __init__(self, target: tuple[str, int]):
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            with self.lock:
                self.sockets += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                with suppress(OSError):
                    end.shutdown(socket.SHUT_RDWR)

    def stop(self) -> None:
        """The database 'stops': open connections drop, new ones are refused."""
        self.listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept(); close() alone would not
        self.listener.close()
        with self.lock:
            for end in self.sockets:
                with suppress(OSError):
                    end.shutdown(socket.SHUT_RDWR)
                end.close()


@contextmanager
def serving(app) -> Iterator[str]:  # noqa: ANN001 - a FastAPI app
    """The app under a real uvicorn server in a thread (one event loop, as in production); yields its URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture
def postgres_database(postgres_server) -> Iterator[str]:
    url = create_throwaway_postgres(postgres_server)
    upgrade_database(url)
    try:
        yield url
    finally:
        drop_throwaway_postgres(postgres_server, url)


@pytest.mark.slow
def test_stopped_postgres_gives_503_json_with_a_retry_hint(tmp_path, tiny_encoder_dir, postgres_database, clean_env):
    direct = make_url(postgres_database)
    proxy = TcpProxy((direct.host or "127.0.0.1", direct.port or 5432))
    through_proxy = direct.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    settings = make_settings(tmp_path, tiny_encoder_dir, database_url=through_proxy, database_connect_timeout_s=2)
    with serving(create_app(settings)) as url:
        created = httpx.post(f"{url}/api/collections", json={"name": "pg"}, timeout=30)
        assert created.status_code == 201, created.text
        proxy.stop()
        for method, path, body in [
            ("GET", "/api/collections", None),
            ("GET", f"/api/collections/{created.json()['id']}", None),
            ("POST", "/api/search", {"collection_id": 1, "terms": [{"image_id": 1, "attribute": "lighting"}]}),
        ]:
            response = httpx.request(method, f"{url}{path}", json=body, timeout=30)
            assert response.status_code == 503, (path, response.status_code, response.text)
            assert response.headers["content-type"] == "application/json"
            assert response.headers["retry-after"].isdigit()
            assert "try again" in response.json()["detail"]
        assert httpx.get(f"{url}/api/health", timeout=5).status_code == 200


@pytest.mark.slow
def test_hung_postgres_holds_only_its_request(tmp_path, tiny_encoder_dir, postgres_database, clean_env):
    settings = make_settings(tmp_path, tiny_encoder_dir, database_url=postgres_database, database_statement_timeout_s=3)
    locker = create_engine(postgres_database)
    with serving(create_app(settings)) as url:
        collection_id = httpx.post(f"{url}/api/collections", json={"name": "pg"}, timeout=30).json()["id"]
        with locker.connect() as connection:
            # Another session holds every table search reads: its queries wait on the lock, as on a hung server.
            connection.execute(text("LOCK TABLE collections, images, collection_attributes IN ACCESS EXCLUSIVE MODE"))
            answers: dict[str, httpx.Response] = {}
            body = {"collection_id": collection_id, "terms": [{"image_id": 1, "attribute": "lighting"}]}
            search = threading.Thread(
                target=lambda: answers.update(search=httpx.post(f"{url}/api/search", json=body, timeout=60))
            )
            started = time.monotonic()
            search.start()
            time.sleep(0.5)  # the search is now waiting on the lock
            health = httpx.get(f"{url}/api/health", timeout=2)  # today: blocked behind the search, times out
            assert health.status_code == 200
            assert time.monotonic() - started < 2.5
            search.join(timeout=30)
            connection.rollback()
        assert answers["search"].status_code == 503, answers["search"].text
        assert "try again" in answers["search"].json()["detail"]
        assert time.monotonic() - started < 20  # the statement timeout (3 s) ended it, not the lock's release
    locker.dispose()
