"""scripts/demo.py (`make demo`): the sample collection and the encoder choice. The whole demo (ingest, index,
serve) is run by `make demo`; its timing is in the README."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
from PIL import Image

from tests.deploy.checks import ROOT


@pytest.fixture(scope="module")
def demo():
    spec = importlib.util.spec_from_file_location("omniattr_demo", ROOT / "scripts" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


@pytest.fixture(scope="module")
def collection(demo, tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "images"
    return out, demo.build_collection(out)


@pytest.mark.slow
def test_sample_collection_has_a_few_hundred_photos_and_procedural_images(collection):
    out, count = collection
    files = sorted(out.rglob("*.png"))
    assert 250 <= count == len(files) <= 400
    assert len(list((out / "photos").glob("*.png"))) >= 100
    assert len(list((out / "procedural").glob("*.png"))) >= 100
    for file in files[:: max(1, len(files) // 25)]:
        with Image.open(file) as image:
            image.load()
            assert image.mode == "RGB" and min(image.size) >= 64


@pytest.mark.slow
def test_example_queries_name_images_of_the_collection(demo, collection):
    out, _ = collection
    for example in demo.EXAMPLES:
        for file, attribute in [*example.terms, *example.negatives]:
            assert (out / file).is_file(), file
            assert attribute in demo.ATTRIBUTES


def test_rebuild_is_skipped_when_the_manifest_matches(demo, collection):
    out, count = collection
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["version"] == demo.BUILDER_VERSION and len(manifest["images"]) == count
    before = (out / "manifest.json").stat().st_mtime_ns
    assert demo.build_collection(out) == count
    assert (out / "manifest.json").stat().st_mtime_ns == before


def test_encoder_is_the_starter_model_when_shipped(demo, tmp_path, monkeypatch):
    starter = tmp_path / "starter" / "encoder"
    starter.mkdir(parents=True)
    (starter / "encoder_config.json").write_text("{}")
    monkeypatch.setattr(demo, "STARTER_ENCODER", starter)
    monkeypatch.setattr(demo, "ROOT", tmp_path)
    monkeypatch.setattr(demo, "run", lambda *args: pytest.fail("must not write an untrained encoder"))
    assert demo.choose_encoder(tmp_path / "data", {}) == starter


def test_encoder_falls_back_to_an_untrained_one_with_a_warning(demo, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo, "STARTER_ENCODER", tmp_path / "absent")
    calls = []
    monkeypatch.setattr(demo, "run", lambda command, env: calls.append(command))
    monkeypatch.setattr(demo, "omniattr", lambda: "omniattr")
    chosen = demo.choose_encoder(tmp_path / "data", {})
    assert chosen == tmp_path / "data" / "encoder"
    assert calls == [["omniattr", "init-encoder", str(chosen)]]
    assert "UNTRAINED" in capsys.readouterr().err


def test_demo_environment_is_embedded_whatever_the_caller_set(demo, tmp_path, monkeypatch):
    monkeypatch.setenv("OMNIATTR_PROFILE", "server")
    monkeypatch.setenv("OMNIATTR_DATABASE_URL", "postgresql+psycopg://elsewhere/db")
    env = demo.demo_environment(tmp_path)
    assert env["OMNIATTR_PROFILE"] == "embedded" and env["OMNIATTR_DATA_DIR"] == str(tmp_path)
    assert "OMNIATTR_DATABASE_URL" not in env


def test_demo_says_whether_the_shipped_generator_serves_personalize(demo, tmp_path, monkeypatch):
    """The demo sets no generator: `omniattr up` takes models/starter/generator by the settings rule, and the demo's
    line follows the same rule (whatever OMNIATTR_* the caller had set, as demo_environment drops them)."""
    monkeypatch.setenv("OMNIATTR_GENERATIONS_ENABLED", "false")  # dropped for the demo's server: must not count
    monkeypatch.setattr("omniattr.settings.SHIPPED_GENERATOR_PATH", tmp_path / "absent")
    assert "none" in demo.describe_generator() and "Personalize is off" in demo.describe_generator()
    shipped = tmp_path / "starter" / "generator"
    shipped.mkdir(parents=True)
    (shipped / "model_index.json").write_text("{}")  # the settings rule looks for this file only
    monkeypatch.setattr("omniattr.settings.SHIPPED_GENERATOR_PATH", shipped)
    assert demo.describe_generator().startswith("[demo] generator: the shipped starter model")
