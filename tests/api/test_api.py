"""The HTTP API end to end on the embedded profile: upload, index, search, jobs, errors."""

from __future__ import annotations

import pytest

from tests.api.conftest import png, wait_for_job


def indexed_collection(client, attributes=("lighting", "art style"), count=8):
    collection = client.post("/api/collections", json={"name": "photos"}).json()
    files = [("files", (f"p{i}.png", png(i), "image/png")) for i in range(count)]
    report = client.post(f"/api/collections/{collection['id']}/images", files=files).json()
    assert [r["status"] for r in report["results"]] == ["ready"] * count
    response = client.post(f"/api/collections/{collection['id']}/attributes", json={"attributes": list(attributes)})
    assert response.status_code == 202, response.text
    job = wait_for_job(client, response.json()["job"]["id"])
    assert (job["status"], job["done"], job["total"]) == ("done", count * len(attributes), count * len(attributes))
    return collection["id"], [r["image_id"] for r in report["results"]]


@pytest.mark.slow
def test_collection_lifecycle_and_listing(client):
    created = client.post("/api/collections", json={"name": "a", "description": "d"})
    assert created.status_code == 201
    assert client.post("/api/collections", json={"name": "a"}).status_code == 409
    collection_id = created.json()["id"]
    files = [
        ("files", ("x.png", png(1), "image/png")),
        ("files", ("bad.png", b"nope", "image/png")),
        ("files", ("dup.png", png(1), "image/png")),
    ]
    report = client.post(f"/api/collections/{collection_id}/images", files=files).json()
    assert [(r["status"], r["created"]) for r in report["results"]] == [
        ("ready", True),
        ("failed", True),
        ("ready", False),
    ]
    assert "not an image" in report["results"][1]["error"]
    page = client.get(f"/api/collections/{collection_id}/images", params={"status": "ready"}).json()
    assert page["count"] == 1 and page["next_after_id"] is None
    image = page["data"][0]
    thumbnail = client.get(image["thumbnail_url"])
    assert thumbnail.status_code == 200 and thumbnail.headers["content-type"] == "image/jpeg"
    assert client.get(f"/api/images/{image['id']}/original").content == png(1)
    listed = client.get("/api/collections").json()
    assert listed["data"][0]["image_count"] == 1 and listed["data"][0]["failed_count"] == 1
    assert client.delete(f"/api/collections/{collection_id}").status_code == 204
    assert client.get(f"/api/collections/{collection_id}").status_code == 404


@pytest.mark.slow
def test_search_by_image_id_upload_and_fusion(client):
    collection_id, image_ids = indexed_collection(client)
    query = image_ids[0]
    single = client.post(
        "/api/search",
        json={"collection_id": collection_id, "limit": 5, "terms": [{"image_id": query, "attribute": "Lighting"}]},
    ).json()
    assert len(single["results"]) == 5
    assert query not in [r["image"]["id"] for r in single["results"]]  # the query image is excluded
    scores = [r["score"] for r in single["results"]]
    assert scores == sorted(scores, reverse=True)
    assert set(single["results"][0]["attribute_scores"]) == {"lighting"}

    kept = client.post(
        "/api/search",
        json={
            "collection_id": collection_id,
            "limit": 1,
            "include_query_images": True,
            "terms": [{"image_id": query, "attribute": "lighting"}],
        },
    ).json()
    assert kept["results"][0]["image"]["id"] == query and kept["results"][0]["score"] == pytest.approx(1.0, abs=1e-4)

    uploaded = client.post(
        "/api/search/upload",
        data={"collection_id": collection_id, "attribute": "lighting", "limit": 1},
        files={"image": ("q.png", png(0), "image/png")},
    ).json()
    assert uploaded["results"][0]["image"]["id"] == query  # the same pixels find themselves first

    fused = client.post(
        "/api/search",
        json={
            "collection_id": collection_id,
            "limit": 8,
            "terms": [
                {"image_id": image_ids[0], "attribute": "lighting", "weight": 0.7},
                {"image_id": image_ids[1], "attribute": "art style", "weight": 0.3},
            ],
            "negatives": [{"image_id": image_ids[2], "attribute": "lighting", "weight": 0.5}],
        },
    ).json()
    for result in fused["results"]:
        parts = result["attribute_scores"]
        expected = 0.7 * parts["lighting"] + 0.3 * parts["art style"] - 0.5 * result["negative_scores"]["lighting"]
        assert result["score"] == pytest.approx(expected, abs=1e-5)
    assert {r["image"]["id"] for r in fused["results"]}.isdisjoint(image_ids[:3])

    filtered = client.post(
        "/api/search",
        json={
            "collection_id": collection_id,
            "filters": {"format": "JPEG"},
            "terms": [{"image_id": query, "attribute": "lighting"}],
        },
    ).json()
    assert filtered["results"] == []  # every image is a PNG
    pngs = client.post(
        "/api/search",
        json={
            "collection_id": collection_id,
            "filters": {"format": ["PNG", "GIF"]},
            "terms": [{"image_id": query, "attribute": "lighting"}],
        },
    ).json()
    assert len(pngs["results"]) == len(image_ids) - 1


@pytest.mark.slow
def test_backfill_and_new_uploads_are_indexed(client):
    collection_id, image_ids = indexed_collection(client, attributes=("lighting",), count=4)
    again = client.post(f"/api/collections/{collection_id}/attributes", json={"attributes": ["lighting"]}).json()
    assert again["job"] is None
    report = client.post(
        f"/api/collections/{collection_id}/images", files=[("files", ("new.png", png(99), "image/png"))]
    ).json()
    job = wait_for_job(client, report["index_job_id"])
    assert (job["kind"], job["total"]) == ("index_new_images", 1)
    hits = client.post(
        "/api/search",
        json={
            "collection_id": collection_id,
            "limit": 10,
            "terms": [{"image_id": image_ids[0], "attribute": "lighting"}],
        },
    ).json()
    assert report["results"][0]["image_id"] in [r["image"]["id"] for r in hits["results"]]
    jobs = client.get("/api/jobs", params={"collection_id": collection_id}).json()
    assert jobs["count"] == 2


@pytest.mark.slow
def test_errors_are_json_with_the_right_status(client):
    collection_id, image_ids = indexed_collection(client, attributes=("lighting",), count=2)
    not_indexed = client.post(
        "/api/search", json={"collection_id": collection_id, "terms": [{"image_id": image_ids[0], "attribute": "pose"}]}
    )
    assert not_indexed.status_code == 409
    assert f"POST /api/collections/{collection_id}/attributes" in not_indexed.json()["detail"]
    assert (
        client.post(
            "/api/search", json={"collection_id": 999, "terms": [{"image_id": 1, "attribute": "x"}]}
        ).status_code
        == 404
    )
    assert client.get("/api/images/424242").status_code == 404
    assert client.get("/api/jobs/424242").status_code == 404
    empty = client.post(f"/api/collections/{collection_id}/attributes", json={"attributes": ["   "]})
    assert empty.status_code == 400 and "attribute text is empty" in empty.json()["detail"]
    invalid = client.post("/api/search", json={"collection_id": collection_id, "terms": []})
    assert invalid.status_code == 422 and "terms" in invalid.json()["detail"]
    outside = client.post(f"/api/collections/{collection_id}/ingest", json={"path": "/etc"})
    assert outside.status_code == 400 and "outside the allowed roots" in outside.json()["detail"]
    bad_query = client.post(
        "/api/search/upload",
        data={"collection_id": collection_id, "attribute": "lighting"},
        files={"image": ("q.png", b"not an image", "image/png")},
    )
    assert bad_query.status_code == 400 and "query image" in bad_query.json()["detail"]
    too_big = client.post(
        f"/api/collections/{collection_id}/images",
        content=b"x" * 10,
        headers={"content-length": str(10**12), "content-type": "multipart/form-data; boundary=x"},
    )
    assert too_big.status_code == 413 and "limit" in too_big.json()["detail"]


@pytest.mark.slow
def test_ingest_from_path_as_a_job(client, tmp_path):
    photos = tmp_path / "photos"
    for i in range(3):
        (photos / f"{i}.png").write_bytes(png(i + 50))
    collection_id = client.post("/api/collections", json={"name": "disk"}).json()["id"]
    response = client.post(f"/api/collections/{collection_id}/ingest", json={"path": str(photos)})
    assert response.status_code == 202
    job = wait_for_job(client, response.json()["id"])
    assert (job["kind"], job["status"], job["done"]) == ("ingest", "done", 3)


def test_openapi_documents_every_route(client):
    paths = client.get("/openapi.json").json()["paths"]
    for path in (
        "/api/collections",
        "/api/collections/{collection_id}/images",
        "/api/search",
        "/api/search/upload",
        "/api/generations",
        "/api/generations/upload",
        "/api/jobs/{job_id}",
        "/api/collections/{collection_id}/attributes",
        "/api/health",
    ):
        assert path in paths
