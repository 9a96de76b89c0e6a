"""Personalize and compose from the API with a tiny real generator (diffusers FLUX transformer + VAE + text
encoders, saved and loaded through the flux plugin) and the tiny real encoder."""

from __future__ import annotations

import io
import json
import os

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from api.app import create_app
from omniattr.domain import DEFAULT_BASE_STRENGTH, DEFAULT_KEEP_DETAIL
from store.database import upgrade_database
from tests.api.conftest import make_settings, png, wait_for_job


def client_for(tmp_path, tiny_encoder_dir, monkeypatch, **overrides):
    for key in [k for k in os.environ if k.startswith("OMNIATTR_")]:
        monkeypatch.delenv(key)
    settings = make_settings(tmp_path, tiny_encoder_dir, generation_steps=2, generation_size=64, **overrides)
    upgrade_database(settings.resolved_database_url)
    return TestClient(create_app(settings))


def upload(client, count=3):
    collection_id = client.post("/api/collections", json={"name": "refs"}).json()["id"]
    report = client.post(
        f"/api/collections/{collection_id}/images",
        files=[("files", (f"{i}.png", png(i), "image/png")) for i in range(count)],
    ).json()
    return [r["image_id"] for r in report["results"]]


@pytest.mark.slow
def test_personalize_and_compose(tmp_path, tiny_encoder_dir, generator_dir, monkeypatch):
    with client_for(tmp_path, tiny_encoder_dir, monkeypatch, generator_path=generator_dir) as client:
        assert client.get("/api/health").json()["generator"] == "flux"
        ids = upload(client)
        response = client.post(
            "/api/generations",
            json={"refs": [{"image_id": ids[0], "attribute": "Lighting"}], "prompt": "a cup", "seed": 7},
        )
        assert response.status_code == 202, response.text
        generation = response.json()
        assert wait_for_job(client, generation["job_id"])["status"] == "done"
        done = client.get(f"/api/generations/{generation['id']}").json()
        assert done["status"] == "done" and set(done["transfer_scores"]) == {"lighting"}
        assert -1.0 <= done["transfer_scores"]["lighting"] <= 1.0
        image = Image.open(io.BytesIO(client.get(done["output_url"]).content))
        assert image.size == (64, 64)

        again = client.post(
            "/api/generations",
            json={"refs": [{"image_id": ids[0], "attribute": "lighting"}], "prompt": "a cup", "seed": 7},
        ).json()
        wait_for_job(client, again["job_id"])
        same = client.get(f"/api/generations/{again['id']}").json()
        assert client.get(same["output_url"]).content == client.get(done["output_url"]).content  # same seed

        composed = client.post(
            "/api/generations",
            json={
                "refs": [
                    {"image_id": ids[0], "attribute": "lighting", "weight": 0.7},
                    {"image_id": ids[1], "attribute": "art style", "weight": 0.3},
                    {"image_id": ids[2], "attribute": "lighting", "weight": 0.5},
                ],
                "prompt": "a cup",
                "seed": 1,
            },
        ).json()
        wait_for_job(client, composed["job_id"])
        result = client.get(f"/api/generations/{composed['id']}").json()
        assert set(result["transfer_scores"]) == {
            f"lighting (image {ids[0]})",
            "art style",
            f"lighting (image {ids[2]})",
        }


@pytest.mark.slow
def test_apply_to_my_image(tmp_path, tiny_encoder_dir, generator_dir, monkeypatch):
    """A base image (stored or uploaded), a strength and the detail kept: the generation starts from the base,
    keeps its detail (DEFAULT_KEEP_DETAIL unless told, none for a style) and records all three."""
    with client_for(tmp_path, tiny_encoder_dir, monkeypatch, generator_path=generator_dir) as client:
        ids = upload(client)
        refs = [{"image_id": ids[0], "attribute": "lighting"}, {"image_id": ids[1], "attribute": "color palette"}]
        body = {"refs": refs, "prompt": "a cup", "seed": 7}
        response = client.post("/api/generations", json={**body, "base_image_id": ids[2], "strength": 0.5})
        assert response.status_code == 202, response.text
        generation = response.json()
        assert (generation["request"]["base_image_id"], generation["request"]["strength"]) == (ids[2], 0.5)
        assert wait_for_job(client, generation["job_id"])["status"] == "done"
        done = client.get(f"/api/generations/{generation['id']}").json()
        assert done["status"] == "done" and set(done["transfer_scores"]) == {"lighting", "color palette"}
        assert done["request"]["base_image_id"] == ids[2] and done["request"]["strength"] == 0.5
        assert done["request"]["keep_detail"] == DEFAULT_KEEP_DETAIL
        from_base = client.get(done["output_url"]).content
        assert Image.open(io.BytesIO(from_base)).size == (64, 64)
        as_is = client.post(
            "/api/generations", json={**body, "base_image_id": ids[2], "strength": 0.5, "keep_detail": 0}
        )
        assert as_is.json()["request"]["keep_detail"] == 0
        assert wait_for_job(client, as_is.json()["job_id"])["status"] == "done"
        assert client.get(f"/api/generations/{as_is.json()['id']}/image").content != from_base  # the detail mattered
        # A style reference: the base's detail would replace its texture, so none is kept unless asked for.
        style = {**body, "refs": [refs[0], {"image_id": ids[1], "attribute": "Art Style"}], "base_image_id": ids[2]}
        by_default = client.post("/api/generations", json=style).json()
        asked = client.post("/api/generations", json={**style, "keep_detail": 3}).json()
        assert (by_default["request"]["keep_detail"], asked["request"]["keep_detail"]) == (0, 3)
        assert all(wait_for_job(client, g["job_id"])["status"] == "done" for g in (by_default, asked))
        plain = client.post("/api/generations", json=body).json()
        assert plain["request"]["base_image_id"] is None and plain["request"]["strength"] is None
        assert plain["request"]["keep_detail"] is None
        wait_for_job(client, plain["job_id"])
        assert client.get(f"/api/generations/{plain['id']}/image").content != from_base  # the base mattered

        # An uploaded base (here a file of another size) without a strength: DEFAULT_BASE_STRENGTH.
        uploaded = client.post(
            "/api/generations/upload",
            files={"base": ("mine.png", png(9, size=80), "image/png")},
            data={"request": json.dumps(body)},
        )
        assert uploaded.status_code == 202, uploaded.text
        request = uploaded.json()["request"]
        assert request["base_image_id"] is None and request["strength"] == DEFAULT_BASE_STRENGTH
        assert len(request["base_upload"]) == 64  # the file's sha256
        assert wait_for_job(client, uploaded.json()["job_id"])["status"] == "done"

        # Validation before any work: bad strength 422, unknown base 404, strength without a base 400.
        for strength in (0, 1.5, -0.2):
            bad = client.post("/api/generations", json={**body, "base_image_id": ids[2], "strength": strength})
            assert bad.status_code == 422, (strength, bad.text)
        missing = client.post("/api/generations", json={**body, "base_image_id": 4242, "strength": 0.5})
        assert missing.status_code == 404 and "4242" in missing.json()["detail"]
        no_base = client.post("/api/generations", json={**body, "strength": 0.5})
        assert no_base.status_code == 400 and "strength needs a base image" in no_base.json()["detail"]
        for keep_detail in (-1, 33, "a lot"):
            bad = client.post("/api/generations", json={**body, "base_image_id": ids[2], "keep_detail": keep_detail})
            assert bad.status_code == 422, (keep_detail, bad.text)
        no_base = client.post("/api/generations", json={**body, "keep_detail": 2})
        assert no_base.status_code == 400 and "keep_detail keeps a base image's detail" in no_base.json()["detail"]
        not_image = client.post(
            "/api/generations/upload",
            files={"base": ("notes.txt", b"not an image", "text/plain")},
            data={"request": json.dumps(body)},
        )
        assert not_image.status_code == 400 and "base image cannot be used" in not_image.json()["detail"]
        both = client.post(
            "/api/generations/upload",
            files={"base": ("mine.png", png(9), "image/png")},
            data={"request": json.dumps({**body, "base_image_id": ids[2]})},
        )
        assert both.status_code == 400 and "not both" in both.json()["detail"]
        bad_json = client.post(
            "/api/generations/upload", files={"base": ("mine.png", png(9), "image/png")}, data={"request": "{"}
        )
        assert bad_json.status_code == 422


@pytest.mark.slow
def test_generation_errors(tmp_path, tiny_encoder_dir, generator_dir, monkeypatch):
    with client_for(tmp_path, tiny_encoder_dir, monkeypatch, generator_path=generator_dir) as client:
        ids = upload(client, count=1)
        nine = [{"image_id": ids[0], "attribute": "lighting"}] * 9
        assert client.post("/api/generations", json={"refs": nine, "prompt": "x"}).status_code == 422
        missing = client.post("/api/generations", json={"refs": [{"image_id": 999, "attribute": "a"}], "prompt": "x"})
        assert missing.status_code == 404
        blank = client.post("/api/generations", json={"refs": [{"image_id": ids[0], "attribute": "a"}], "prompt": " "})
        assert blank.status_code == 400 and "prompt is empty" in blank.json()["detail"]
        assert client.get("/api/generations/424242").status_code == 404
    # Generations switched off: refused (409) even though a generator is shipped beside the code.
    monkeypatch.setattr("omniattr.settings.SHIPPED_GENERATOR_PATH", generator_dir)
    with client_for(tmp_path / "off", tiny_encoder_dir, monkeypatch, generations_enabled=False) as client:
        assert client.get("/api/health").json()["generator"] is None
        ids = upload(client, count=1)
        off = client.post("/api/generations", json={"refs": [{"image_id": ids[0], "attribute": "a"}], "prompt": "x"})
        assert off.status_code == 409 and "OMNIATTR_GENERATOR_PATH" in off.json()["detail"]


@pytest.mark.slow
def test_personalize_uses_the_shipped_generator_by_default(tmp_path, tiny_encoder_dir, generator_dir, monkeypatch):
    """No generator setting at all: a source checkout's models/starter/generator (here the tiny saved one in its
    place) serves a personalize request."""
    monkeypatch.setattr("omniattr.settings.SHIPPED_GENERATOR_PATH", generator_dir)
    with client_for(tmp_path, tiny_encoder_dir, monkeypatch) as client:
        assert client.app.state.settings.generator_path is None
        assert client.get("/api/health").json()["generator"] == "flux"
        ids = upload(client, count=1)
        response = client.post(
            "/api/generations",
            json={"refs": [{"image_id": ids[0], "attribute": "lighting"}], "prompt": "a cup", "seed": 7},
        )
        assert response.status_code == 202, response.text
        assert wait_for_job(client, response.json()["job_id"])["status"] == "done"
        done = client.get(f"/api/generations/{response.json()['id']}").json()
        assert done["status"] == "done" and set(done["transfer_scores"]) == {"lighting"}
        assert Image.open(io.BytesIO(client.get(done["output_url"]).content)).size == (64, 64)
