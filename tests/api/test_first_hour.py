"""A new user's first hour (issue 16): failures reach the user clearly, the CLI says what it did, and is quick."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from omniattr.cli import main

ROOT = Path(__file__).resolve().parents[2]
OMNIATTR = str(Path(sys.executable).with_name("omniattr"))


def broken_generator(tmp_path: Path) -> Path:
    """A folder shaped like a FLUX generator (passes the start-up check) whose weights do not load."""
    root = tmp_path / "broken-generator"
    for part in ("transformer", "vae", "scheduler"):
        (root / part).mkdir(parents=True)
    (root / "transformer" / "config.json").write_text("{not json")
    return root


@pytest.mark.slow
def test_failed_generation_is_shown_failed_by_the_cli(embedded_env, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OMNIATTR_GENERATOR_PATH", str(broken_generator(tmp_path)))
    assert main(["ingest", str(embedded_env), "--collection", "demo", "--json"]) == 0
    capsys.readouterr()
    started = time.monotonic()
    code = main(["personalize", "--ref", "1:lighting", "--prompt", "a cup", "--out", str(tmp_path / "o.png")])
    err = capsys.readouterr().err
    assert code == 2
    assert "generation 1 failed: " in err and "None" not in err
    assert "Traceback" not in err
    assert time.monotonic() - started < 120  # it ended, it did not spin


@pytest.mark.slow
def test_generator_path_that_does_not_exist_stops_up_at_once(embedded_env, tmp_path):
    env = {**os.environ, "OMNIATTR_GENERATOR_PATH": str(tmp_path / "no-such-generator")}
    env["OMNIATTR_API_PORT"] = "1"  # never reached: the check comes first
    result = subprocess.run([OMNIATTR, "up"], env=env, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 2
    assert "OMNIATTR_GENERATOR_PATH" in result.stderr and "is not a directory" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_ingest_reports_failures_and_duplicates(embedded_env, capsys):
    (embedded_env / "broken.png").write_bytes(b"not an image at all")
    assert main(["ingest", str(embedded_env), "--collection", "demo"]) == 0
    first = capsys.readouterr().out
    assert "6 new images ingested, 0 duplicates" in first and "1 failed" in first
    assert "broken.png" in first and "not an image" in first
    assert main(["ingest", str(embedded_env), "--collection", "demo"]) == 0
    again = capsys.readouterr().out
    assert "0 new images ingested, 7 duplicates" in again


@pytest.mark.slow
def test_images_lists_ids_and_search_echoes_the_query(embedded_env, capsys):
    assert main(["ingest", str(embedded_env), "--collection", "demo", "--json"]) == 0
    capsys.readouterr()
    assert main(["images", "--collection", "demo"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert len(listed) == 6
    assert listed[0].split()[0] == "1" and listed[0].endswith("0.png")
    assert main(["images", "--collection", "demo", "--json"]) == 0
    assert [i["id"] for i in json.loads(capsys.readouterr().out)] == [1, 2, 3, 4, 5, 6]
    assert main(["index", "--collection", "demo", "lighting", "--json"]) == 0
    capsys.readouterr()
    assert main(["search", "--collection", "demo", "--term", "2:lighting", "--limit", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "search demo: 2:lighting (top 2)"
    assert len(out) == 3


@pytest.mark.slow
def test_missing_query_image_is_one_line(embedded_env, capsys):
    assert main(["ingest", str(embedded_env), "--collection", "demo", "--json"]) == 0
    capsys.readouterr()
    code = main(["search", "--collection", "demo", "--image", "nope.png", "--attribute", "lighting"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip() == "omniattr: --image nope.png: no such file"


@pytest.mark.slow
def test_help_texts(capsys):
    with pytest.raises(SystemExit):
        main(["up", "--help"])
    up_help = capsys.readouterr().out
    assert "127.0.0.1" in up_help and "8000" in up_help and "data" in up_help
    result = subprocess.run([OMNIATTR, "eval", "--help"], capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0
    assert "--model" in result.stdout and "--pairs" in result.stdout


def test_settings_shows_the_encoder_in_use(tmp_path, monkeypatch, capsys):
    from omniattr.settings import SHIPPED_ENCODER_PATH

    for key in [k for k in os.environ if k.startswith("OMNIATTR_")]:
        monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)
    assert main(["settings"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["encoder_path"] == str(SHIPPED_ENCODER_PATH)
    assert shown["encoder_path_from"] == "the shipped starter encoder"


def test_settings_shows_the_generator_in_use(generator_dir, tmp_path, monkeypatch, capsys):
    for key in [k for k in os.environ if k.startswith("OMNIATTR_")]:
        monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("omniattr.settings.SHIPPED_GENERATOR_PATH", generator_dir)
    assert main(["settings"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["generator_path"] == str(generator_dir)
    assert shown["generator_path_from"] == "the shipped starter generator"
    monkeypatch.setenv("OMNIATTR_GENERATIONS_ENABLED", "false")
    assert main(["settings"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["generator_path"] is None and shown["generator_path_from"].endswith("generations are off")


@pytest.mark.slow
def test_search_by_id_does_not_load_the_model(embedded_env, capsys):
    """A search by stored id needs no encoder: torch (and qdrant-client, the server backend) stay unimported."""
    assert main(["ingest", str(embedded_env), "--collection", "demo", "--json"]) == 0
    assert main(["index", "--collection", "demo", "lighting", "--json"]) == 0
    capsys.readouterr()
    # Besides the model: Alembic (imported only to migrate; the database is at head here) and the second HTTP
    # library that Starlette's TestClient brings (the in-process client is plain httpx), ~0.4 s each.
    unwanted = ["torch", "qdrant_client", "alembic", "httpx2", "starlette.testclient"]
    probe = (
        "import sys, time; started = time.perf_counter(); from omniattr.cli import main; "
        "code = main(['search', '--collection', 'demo', '--term', '1:lighting', '--json']); "
        f"print(code, *[m in sys.modules for m in {unwanted!r}], time.perf_counter() - started, file=sys.stderr)"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-P", "-c", probe], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    code, *loaded, seconds = result.stderr.split()[-(len(unwanted) + 2) :]
    assert code == "0", result.stderr
    assert dict(zip(unwanted, loaded, strict=True)) == dict.fromkeys(unwanted, "False"), result.stderr
    print(f"search by id, embedded, in-process: {float(seconds):.2f} s")  # reported, not asserted: shared CPUs


@pytest.mark.slow
def test_encoder_load_prints_no_future_warning(tiny_encoder_dir):
    from encoder import AttributeEncoder

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        AttributeEncoder.from_pretrained(tiny_encoder_dir)
    assert [str(w.message) for w in caught if issubclass(w.category, FutureWarning)] == []


def test_demo_uses_the_data_dir_of_omniattr_up():
    import importlib.util

    from omniattr.settings import Settings

    spec = importlib.util.spec_from_file_location("demo_script", ROOT / "scripts" / "demo.py")
    demo = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = demo
    spec.loader.exec_module(demo)
    up_default = Settings.model_fields["data_dir"].default  # relative: `omniattr up` started in the checkout
    assert ROOT / up_default == demo.ROOT / demo.DEFAULT_DATA_DIR
