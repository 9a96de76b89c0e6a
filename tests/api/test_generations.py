"""Personalize and compose from the API with a tiny real generator (diffusers FLUX transformer + VAE + text
encoders, saved and loaded through the flux plugin) and the tiny real encoder."""

from __future__ import annotations

import io
import os

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from api.app import create_app
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
    with client_for(tmp_path / "off", tiny_encoder_dir, monkeypatch) as client:
        assert client.get("/api/health").json()["generator"] is None
        ids = upload(client, count=1)
        off = client.post("/api/generations", json={"refs": [{"image_id": ids[0], "attribute": "a"}], "prompt": "x"})
        assert off.status_code == 409 and "OMNIATTR_GENERATOR_PATH" in off.json()["detail"]
