"""The omniattr CLI as a user runs it: in-process on the embedded profile, and against a running server."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from omniattr.cli import main
from omniattr.domain import DEFAULT_KEEP_DETAIL
from tests.api.conftest import png, running_server

ROOT = Path(__file__).resolve().parents[2]


def run_json(capsys, *argv: str) -> object:
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.slow
def test_ingest_index_search_in_process(embedded_env, capsys):
    job = run_json(capsys, "ingest", str(embedded_env), "--collection", "demo")
    assert (job["status"], job["done"]) == ("done", 6)
    indexed = run_json(capsys, "index", "--collection", "demo", "lighting", "art style")
    assert indexed["job"]["done"] == 12
    again = run_json(capsys, "index", "--collection", "demo", "lighting")
    assert again["job"] is None and "already indexed" in again["detail"]
    results = run_json(
        capsys,
        "search",
        "--collection",
        "demo",
        "--term",
        "1:lighting:0.7",
        "--term",
        "2:art style",
        "--negative",
        "3:lighting",
        "--limit",
        "3",
    )
    assert len(results["results"]) == 3
    assert {"lighting", "art style"} <= set(results["results"][0]["attribute_scores"])
    by_file = run_json(
        capsys,
        "search",
        "--collection",
        "demo",
        "--image",
        str(embedded_env / "0.png"),
        "--attribute",
        "lighting",
        "--limit",
        "1",
    )
    assert by_file["results"][0]["image"]["source"].endswith("0.png")
    jobs = run_json(capsys, "jobs")
    assert [j["kind"] for j in jobs["data"]] == ["index", "ingest"]
    assert main(["search", "--collection", "demo"]) == 2
    assert "--term IMAGE_ID:ATTRIBUTE" in capsys.readouterr().err
    assert main(["search", "--collection", "nope", "--term", "1:lighting"]) == 2
    assert "no collection 'nope'" in capsys.readouterr().err


@pytest.mark.slow
def test_personalize_writes_the_image(embedded_env, generator_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OMNIATTR_GENERATOR_PATH", str(generator_dir))
    monkeypatch.setenv("OMNIATTR_GENERATION_STEPS", "2")
    monkeypatch.setenv("OMNIATTR_GENERATION_SIZE", "64")
    run_json(capsys, "ingest", str(embedded_env), "--collection", "demo")
    out = tmp_path / "made.png"
    result = run_json(
        capsys,
        "personalize",
        "--ref",
        "1:lighting",
        "--ref",
        "2:art style:0.5",
        "--prompt",
        "a cup",
        "--seed",
        "3",
        "--out",
        str(out),
    )
    assert set(result["transfer_scores"]) == {"lighting", "art style"}
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Apply to my image: --base a stored image id, then an image file (uploaded), with --strength.
    common = ["personalize", "--ref", "1:lighting", "--prompt", "a cup", "--seed", "3"]
    by_id = run_json(capsys, *common, "--base", "4", "--strength", "0.5", "--out", str(tmp_path / "by-id.png"))
    assert (by_id["request"]["base_image_id"], by_id["request"]["strength"]) == (4, 0.5)
    assert (tmp_path / "by-id.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    mine = tmp_path / "mine.png"
    mine.write_bytes(png(42, size=96))
    by_file = run_json(
        capsys,
        *common,
        "--base",
        str(mine),
        "--strength",
        "0.3",
        "--keep-detail",
        "0",
        "--out",
        str(tmp_path / "f.png"),
    )
    assert by_file["request"]["base_image_id"] is None and by_file["request"]["strength"] == 0.3
    assert (by_id["request"]["keep_detail"], by_file["request"]["keep_detail"]) == (DEFAULT_KEEP_DETAIL, 0)
    assert by_file["request"]["base_upload"] == hashlib.sha256(mine.read_bytes()).hexdigest()
    assert (tmp_path / "f.png").read_bytes() != (tmp_path / "by-id.png").read_bytes()
    assert main([*common, "--base", "no-such-file.png"]) == 2
    assert "no such file, and not an image id" in capsys.readouterr().err
    assert main([*common, "--strength", "0.5"]) == 2
    assert "--strength needs --base" in capsys.readouterr().err
    assert main([*common, "--base", "4", "--keep-detail", "0", "--out", str(tmp_path / "as-is.png")]) == 0
    assert "from 4 at strength 0.6, the generator's output as is)" in capsys.readouterr().out
    assert main([*common, "--keep-detail", "2"]) == 2
    assert "--keep-detail needs --base" in capsys.readouterr().err
    assert main([*common, "--base", "4", "--strength", "1.5"]) == 2
    assert "HTTP 422" in capsys.readouterr().err


def test_keys_are_created_listed_and_revoked(embedded_env, capsys):
    created = run_json(capsys, "keys", "create", "alice")
    assert created["key"].startswith("oa_")
    listed = run_json(capsys, "keys", "list")
    assert [(k["name"], k["revoked"]) for k in listed] == [("alice", False)]
    assert created["key"] not in json.dumps(listed)
    assert main(["keys", "revoke", str(created["id"])]) == 0
    capsys.readouterr()
    assert run_json(capsys, "keys", "list")[0]["revoked"] is True


@pytest.mark.slow
def test_server_requires_keys_and_cli_talks_to_it(embedded_env, tmp_path, capsys):
    env = {**os.environ, "OMNIATTR_REQUIRE_API_KEYS": "true", "OMNIATTR_ALLOWED_ROOTS": json.dumps([str(embedded_env)])}
    key = run_json(capsys, "keys", "create", "cli")["key"]
    with running_server(env, tmp_path) as url:
        assert httpx.get(f"{url}/api/collections").status_code == 401
        assert httpx.get(f"{url}/api/collections", headers={"X-API-Key": "oa_wrong"}).status_code == 401
        assert httpx.get(f"{url}/api/collections", headers={"X-API-Key": key}).status_code == 200

        # The running server holds the embedded data directory: in-process use is refused with advice.
        assert main(["ingest", str(embedded_env), "--collection", "remote"]) == 2
        assert "--url" in capsys.readouterr().err
        job = run_json(capsys, "ingest", str(embedded_env), "--collection", "remote", "--url", url, "--api-key", key)
        assert (job["status"], job["done"]) == ("done", 6)
        assert main(["jobs", "--url", url]) == 2  # no key
        assert "API key is required" in capsys.readouterr().err


@pytest.mark.slow
def test_train_and_eval_from_the_cli(tmp_path):
    """`omniattr train` on a tiny pair set (L_con only), then `omniattr eval` of the checkpoint."""
    from encoder.testing import tiny_compact_config
    from training.data.procedural import ProceduralConfig, generate_dataset

    generate_dataset(tmp_path / "pairs", 6, seed=5, config=ProceduralConfig(size=64))
    config = {
        "data_dir": str(tmp_path / "pairs"),
        "output_dir": str(tmp_path / "run"),
        "encoder": tiny_compact_config(image_size=64).to_dict(),
        "lambda_gen": 0.0,
        "steps": 2,
        "batch_size": 3,
        "warmup_steps": 1,
        "checkpoint_every": 2,
        "device": "cpu",
        "progress": False,
        "seed": 1,
        "num_threads": 1,
    }
    (tmp_path / "train.json").write_text(json.dumps(config))
    omniattr = str(Path(sys.executable).with_name("omniattr"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    trained = subprocess.run(
        [omniattr, "train", str(tmp_path / "train.json")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert trained.returncode == 0, trained.stderr[-2000:]
    (checkpoint,) = sorted((tmp_path / "run").glob("checkpoint-*"))
    evaluated = subprocess.run(
        [
            omniattr,
            "eval",
            "--model",
            f"tiny={checkpoint / 'encoder'}",
            "--pairs",
            str(tmp_path / "pairs"),
            "--gallery-size",
            "12",
            "--image-size",
            "64",
            "--threads",
            "1",
            "--out",
            str(tmp_path / "eval.md"),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    table = (tmp_path / "eval.md").read_text()
    assert "tiny" in table and "holistic" in table and "mAP@10" in table
    bad = subprocess.run(
        [omniattr, "train", str(tmp_path / "missing.yaml")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode != 0 and "missing.yaml" in bad.stderr


@pytest.mark.slow
def test_readme_main_job_with_an_initialised_encoder(tmp_path, monkeypatch, capsys):
    """The README's main job on the embedded default: no OMNIATTR_ENCODER_PATH, `init-encoder` first."""
    for key in [k for k in os.environ if k.startswith("OMNIATTR_")]:
        monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OMNIATTR_DATA_DIR", str(tmp_path / "data"))
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(4):
        (photos / f"{i}.png").write_bytes(png(i, size=96))
    # An installed wheel has no shipped starter model: then the error says what to do.
    monkeypatch.setattr("omniattr.settings.SHIPPED_ENCODER_PATH", tmp_path / "no-models")
    assert main(["ingest", str(photos), "--collection", "holiday"]) == 2
    assert "omniattr init-encoder" in capsys.readouterr().err

    omniattr = str(Path(sys.executable).with_name("omniattr"))
    made = subprocess.run(
        [omniattr, "init-encoder"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert made.returncode == 0, made.stderr[-2000:]
    assert (tmp_path / "data" / "encoder" / "encoder_config.json").is_file()
    run_json(capsys, "ingest", str(photos), "--collection", "holiday")
    assert run_json(capsys, "index", "--collection", "holiday", "lighting")["job"]["done"] == 4
    results = run_json(capsys, "search", "--collection", "holiday", "--term", "1:lighting")
    assert len(results["results"]) == 3


@pytest.mark.slow
def test_readme_main_job_uses_the_shipped_starter_encoder(tmp_path, monkeypatch, capsys):
    """A source checkout needs no init-encoder: the trained starter model in models/starter/encoder is the default."""
    from omniattr.settings import SHIPPED_ENCODER_PATH, Settings

    for key in [k for k in os.environ if k.startswith("OMNIATTR_")]:
        monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OMNIATTR_DATA_DIR", str(tmp_path / "data"))
    assert Settings().resolved_encoder_path == SHIPPED_ENCODER_PATH
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(4):
        (photos / f"{i}.png").write_bytes(png(i, size=96))
    run_json(capsys, "ingest", str(photos), "--collection", "holiday")
    assert run_json(capsys, "index", "--collection", "holiday", "art style")["job"]["done"] == 4
    results = run_json(capsys, "search", "--collection", "holiday", "--term", "1:art style")
    assert len(results["results"]) == 3


@pytest.mark.slow
def test_export_copies_a_collection_for_pair_mining(embedded_env, tmp_path, capsys):
    run_json(capsys, "ingest", str(embedded_env), "--collection", "demo")
    out = tmp_path / "exported"
    report = run_json(capsys, "export", "--collection", "demo", "--out", str(out))
    assert (report["written"], report["already_there"]) == (6, 0)
    originals = sorted(p.read_bytes() for p in embedded_env.iterdir())
    assert sorted(p.read_bytes() for p in out.iterdir()) == originals
    assert run_json(capsys, "export", "--collection", "demo", "--out", str(out))["already_there"] == 6
    # The exported folder is what `omniattr annotate mine` reads (a band wide enough to keep some pairs).
    omniattr = str(Path(sys.executable).with_name("omniattr"))
    mined = subprocess.run(
        [
            omniattr,
            "annotate",
            "mine",
            str(out),
            "--out",
            str(tmp_path / "pairs.jsonl"),
            "--low",
            "-1",
            "--high",
            "0.9999",
            "--image-size",
            "64",
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert mined.returncode == 0, mined.stderr[-2000:]
    lines = [json.loads(line) for line in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    assert lines and all(Path(line["image_x"]).parent == out for line in lines)
    assert main(["export", "--collection", "nope", "--out", str(out)]) == 2
