"""HTTP hardening: the body limit on the stream, loopback binding, Host and Origin checks, nosniff, media types,
keys out of URLs and logs, the decode budget, and validation before a query image is encoded."""

from __future__ import annotations

import io
import logging
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import uvicorn
from fastapi.testclient import TestClient
from PIL import Image

from api.app import create_app
from api.guards import RedactApiKeys
from api.usecases import keys
from store.database import upgrade_database
from store.errors import InvalidInputError
from tests.api.conftest import free_port, make_settings, png

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def settings(tmp_path, tiny_encoder_dir, monkeypatch):
    for key in [k for k in __import__("os").environ if k.startswith("OMNIATTR_")]:
        monkeypatch.delenv(key)
    app_settings = make_settings(tmp_path, tiny_encoder_dir, max_request_bytes=1024 * 1024)
    upgrade_database(app_settings.resolved_database_url)
    return app_settings


def test_chunked_upload_over_the_limit_is_refused_while_streaming(settings):
    """A real server (the test client reads the whole body first); the body has no Content-Length."""
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings), host="127.0.0.1", port=free_port(), log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.config.port}"
    deadline = time.monotonic() + 60
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    sent = 0
    chunk = b"x" * 65536

    def body():  # one file part that never ends
        nonlocal sent
        yield b'--xyz\r\nContent-Disposition: form-data; name="files"; filename="a.png"\r\n'
        yield b"Content-Type: image/png\r\n\r\n"
        while sent < 64 * 1024 * 1024:  # 64 MiB offered against a 1 MiB limit
            sent += len(chunk)
            yield chunk

    try:
        collection = httpx.post(f"{url}/api/collections", json={"name": "big"}).json()
        response = httpx.post(
            f"{url}/api/collections/{collection['id']}/images",
            content=body(),
            headers={"Content-Type": "multipart/form-data; boundary=xyz"},
            timeout=60,
        )
        assert response.status_code == 413
        assert "limit" in response.json()["detail"]
        assert sent < 16 * 1024 * 1024, f"{sent:,} bytes were read before the refusal"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def test_embedded_profile_refuses_to_bind_off_loopback_without_keys(settings):
    with pytest.raises(InvalidInputError, match="OMNIATTR_REQUIRE_API_KEYS"):
        create_app(settings, bind_host="0.0.0.0")
    create_app(settings, bind_host="127.0.0.1")  # loopback: fine
    create_app(settings.model_copy(update={"require_api_keys": True}), bind_host="0.0.0.0")  # keys: fine


def test_omniattr_up_off_loopback_without_keys_exits_with_the_setting_named(settings):
    env = {"PATH": "/usr/bin:/bin", "OMNIATTR_DATA_DIR": str(settings.data_dir), "HOME": str(settings.data_dir)}
    result = subprocess.run(
        [str(Path(sys.executable).with_name("omniattr")), "up", "--host", "0.0.0.0", "--port", str(free_port())],
        env={**env, "OMNIATTR_ENCODER_PATH": str(settings.encoder_path), "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert "OMNIATTR_REQUIRE_API_KEYS" in result.stderr


def test_a_loopback_server_refuses_foreign_host_headers(settings):
    with TestClient(create_app(settings, bind_host="127.0.0.1"), base_url="http://127.0.0.1:8000") as client:
        assert client.get("/api/health").status_code == 200
        assert client.get("/api/health", headers={"Host": "localhost:8000"}).status_code == 200
        assert client.get("/api/health", headers={"Host": "[::1]:8000"}).status_code == 200
        refused = client.get("/api/collections", headers={"Host": "evil.example"})
        assert refused.status_code == 400 and "DNS rebinding" in refused.json()["detail"]
        assert client.get("/", headers={"Host": "evil.example:8000"}).status_code == 400


def test_cross_origin_posts_are_refused_in_the_embedded_profile(settings):
    with TestClient(create_app(settings)) as client:
        assert (
            client.post("/api/collections", json={"name": "a"}, headers={"Origin": "http://testserver"}).status_code
            == 201
        )
        assert client.post("/api/collections", json={"name": "b"}).status_code == 201  # no browser, no Origin
        refused = client.post("/api/collections", json={"name": "c"}, headers={"Origin": "http://evil.example"})
        assert refused.status_code == 403 and "cross-origin" in refused.json()["detail"]
        upload = client.post(
            "/api/collections/1/images",
            files=[("files", ("0.png", png(0), "image/png"))],
            headers={"Origin": "http://evil.example"},
        )
        assert upload.status_code == 403
        assert (
            client.post("/api/collections", json={"name": "d"}, headers={"Sec-Fetch-Site": "cross-site"}).status_code
            == 403
        )
        assert len(client.get("/api/collections").json()["data"]) == 2


def test_nosniff_everywhere_and_originals_served_as_their_decoded_type(settings):
    buffer = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), 90, dtype=np.uint8)).save(buffer, format="PPM")
    with TestClient(create_app(settings)) as client:
        collection = client.post("/api/collections", json={"name": "m"}).json()
        upload = client.post(
            f"/api/collections/{collection['id']}/images",
            files=[("files", ("page.html", buffer.getvalue(), "text/html"))],
        ).json()
        image_id = upload["results"][0]["image_id"]
        original = client.get(f"/api/images/{image_id}/original")
        assert original.status_code == 200 and original.headers["content-type"].startswith("image/")
        for path in ("/", "/api/health", "/static/app.js", "/api/images/999", f"/api/images/{image_id}/thumbnail"):
            assert client.get(path).headers.get("x-content-type-options") == "nosniff", path
        assert original.headers.get("x-content-type-options") == "nosniff"


def test_media_use_a_cookie_not_a_key_in_the_url(settings):
    keyed = settings.model_copy(update={"require_api_keys": True})
    with TestClient(create_app(keyed)) as client:
        _info, key = keys.create_api_key(client.app.state.services.session_factory, name="page")
        header = {"X-API-Key": key}
        collection = client.post("/api/collections", json={"name": "k"}, headers=header).json()
        upload = client.post(
            f"/api/collections/{collection['id']}/images",
            files=[("files", ("0.png", png(0), "image/png"))],
            headers=header,
        ).json()
        thumbnail = f"/api/images/{upload['results'][0]['image_id']}/thumbnail"
        assert "api_key" not in client.get(f"/api/images/{upload['results'][0]['image_id']}", headers=header).text
        assert client.get(f"{thumbnail}?api_key={key}").status_code == 401  # keys never travel in URLs
        session = client.post("/api/session", headers=header)
        assert session.status_code == 204
        cookie = session.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie
        assert client.get(thumbnail).status_code == 200  # the cookie alone loads media
        assert client.post("/api/collections", json={"name": "csrf"}).status_code == 401  # but never authorises a post
        client.delete("/api/session", headers=header)
        client.cookies.clear()
        assert client.get(thumbnail).status_code == 401


def test_api_key_query_values_are_redacted_from_access_logs():
    record = logging.LogRecord(
        "uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
        ("127.0.0.1:5", "GET", "/api/images/1/thumbnail?size=2&api_key=oa_secret123", "1.1", 200), None,
    )  # fmt: skip
    assert RedactApiKeys().filter(record)
    assert "oa_secret123" not in record.getMessage() and "api_key=***" in record.getMessage()
    RedactApiKeys.install()
    assert any(isinstance(f, RedactApiKeys) for f in logging.getLogger("uvicorn.access").filters)


def test_a_16_bit_7999_square_png_decodes_within_a_small_memory_budget(tmp_path):
    """In a fresh process, so its peak RSS is this decode's alone."""
    path = tmp_path / "wide.png"
    Image.new("I;16", (7999, 7999), 1000).save(path)
    assert path.stat().st_size < 1_000_000
    script = (
        "import resource, sys; from pathlib import Path; from indexer.ingest import decode_image\n"
        "data = Path(sys.argv[1]).read_bytes(); before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "decoded = decode_image(data)\n"
        "print(decoded.width, decoded.height, max(decoded.image.size),"
        " (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)\n"
    )
    output = subprocess.run(
        [sys.executable, "-c", script, str(path)], capture_output=True, text=True, check=True, cwd=ROOT, timeout=120
    ).stdout.split()
    width, height, side, megabytes = map(int, output)
    assert (width, height) == (7999, 7999) and side <= 2048
    assert megabytes < 300, f"decoding cost {megabytes} MB"


def test_decodes_are_bounded_in_number(monkeypatch):
    from indexer import ingest

    running, peak, lock = 0, 0, threading.Lock()
    real_open = Image.open

    def slow_open(*args, **kwargs):
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        time.sleep(0.05)
        with lock:
            running -= 1
        return real_open(*args, **kwargs)

    monkeypatch.setattr(ingest.Image, "open", slow_open)
    threads = [threading.Thread(target=ingest.decode_image, args=(png(i),)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert 1 <= peak <= 2


def test_search_upload_checks_the_collection_and_attribute_before_encoding(client):
    services = client.app.state.services
    encoded = []
    real_encode = services.dispatcher.encode_query

    def recording_encode(**kwargs):
        encoded.append(kwargs["attribute"])
        return real_encode(**kwargs)

    services.dispatcher.encode_query = recording_encode
    image = {"image": ("q.png", png(1), "image/png")}
    missing = client.post("/api/search/upload", data={"collection_id": "999", "attribute": "lighting"}, files=image)
    assert missing.status_code == 404
    collection = client.post("/api/collections", json={"name": "s"}).json()
    unindexed = client.post(
        "/api/search/upload", data={"collection_id": str(collection["id"]), "attribute": "lighting"}, files=image
    )
    assert unindexed.status_code == 409
    assert encoded == []
