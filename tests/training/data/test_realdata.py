"""The real-image data builder: deterministic output from local archives, manifest fields, dedup, skips, refusals.

No network: the test builds its own small .deb with dpkg-deb (images loose, inside a Qt .rcc file and as a GIMP
pattern, a near-duplicate, a tiny icon and a corrupt file) and a small wheel, and points the builder at them.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import struct
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from training.data.rcc import RccError, iter_rcc, write_rcc
from training.data.realdata import (
    KINDS,
    SOURCES,
    RealDataError,
    Rule,
    Source,
    build,
    decode_gimp_pattern,
    main,
    perceptual_hash,
    reserved_pattern,
    select_sources,
)

pytestmark = pytest.mark.skipif(
    shutil.which("dpkg-deb") is None, reason="needs dpkg-deb (Debian tools) to build a .deb"
)

PACKAGE = "omniattr-testimages"
DEB_SOURCE = Source(
    PACKAGE,
    "deb",
    "1.0-1",
    containers=("rcc",),
    rules=(
        Rule(
            "painting",
            ("usr/share/testimages/res/art.rcc!/art/*", "usr/share/testimages/res/art.rcc!/puzzle/resource/board/*"),
        ),
        Rule("cutout", ("usr/share/testimages/cutouts/*",), flat_kind="illustration"),
        Rule("pattern", ("usr/share/testimages/patterns/*.pat",)),
        Rule("photo", ("usr/share/testimages/photos/*", "usr/share/testimages/big/*")),
    ),
)
WHEEL_SOURCE = Source("testphotos", "wheel", "2.0", rules=(Rule("photo", ("testphotos/data/*.npz",)),))
PUZZLE_BOARD = """QtObject {
   property var levels : [
      {"pixmapfile" : "image/bg.svg", "type" : "SHAPE_BACKGROUND_IMAGE", "width": 200, "height": 120},
      {"pixmapfile" : "image/right.png", "x" : "0.75", "y" : "0.5"},
      {"pixmapfile" : "image/left.png", "x" : "0.25", "y" : "0.5"}
   ]
}
"""
COPYRIGHT = """Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/

Files: *
Copyright: 2026 nobody
License: CC0-1.0

Files: debian/*
License: GPL-2+
"""


def smooth_image(seed: int, size: tuple[int, int]) -> Image.Image:
    """A distinct photo-like image: low-frequency colour noise, upsampled."""
    noise = np.random.default_rng(seed).integers(0, 256, (6, 8, 3), dtype=np.uint8)
    return Image.fromarray(noise).resize(size, Image.Resampling.BICUBIC)


def encoded(image: Image.Image, format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def gimp_pattern(image: Image.Image, name: str = "weave") -> bytes:
    name_bytes = name.encode() + b"\0"
    header = struct.pack(">5I", 24 + len(name_bytes), 1, image.width, image.height, 3) + b"GPAT" + name_bytes
    return header + image.convert("RGB").tobytes()


def make_deb(directory: Path, package: str, version: str, files: dict[str, bytes], copyright_text: str) -> Path:
    root = directory / f"{package}-root"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN/control").write_text(
        f"Package: {package}\nVersion: {version}\nArchitecture: all\nMaintainer: Test <test@example.org>\n"
        f"Description: test images\n"
    )
    for path, data in {**files, f"usr/share/doc/{package}/copyright": copyright_text.encode()}.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(data)
    deb = directory / f"{package}_{version.replace(':', '%3a')}_all.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "--build", str(root), str(deb)], check=True, capture_output=True)
    shutil.rmtree(root)
    return deb


@pytest.fixture(scope="module")
def fixture_files() -> dict[str, bytes]:
    base = smooth_image(1, (320, 240))
    disc = Image.new("RGBA", (200, 200), (0, 0, 0, 0))  # a photo-like disc with a transparent margin
    round_mask = Image.new("L", (120, 120), 0)
    ImageDraw.Draw(round_mask).ellipse((0, 0, 119, 119), fill=255)
    disc.paste(smooth_image(2, (120, 120)).convert("RGBA"), (40, 40), round_mask)
    drawn = Image.new("RGBA", (150, 150), (0, 0, 0, 0))  # a drawing in two flat colours
    ImageDraw.Draw(drawn).ellipse((10, 10, 140, 100), fill=(220, 30, 30, 255))
    ImageDraw.Draw(drawn).rectangle((40, 90, 110, 140), fill=(30, 30, 200, 255))
    tile = smooth_image(12, (200, 160)).convert("RGBA")  # a puzzle tile: a notch and a transparent margin
    tile_alpha = Image.new("L", (200, 160), 255)
    ImageDraw.Draw(tile_alpha).rectangle((0, 0, 29, 29), fill=0)
    ImageDraw.Draw(tile_alpha).rectangle((180, 0, 199, 159), fill=0)
    tile.putalpha(tile_alpha)
    brighter = Image.fromarray(np.clip(np.asarray(base, dtype=np.int16) + 12, 0, 255).astype(np.uint8))
    # Warmer: every channel scaled by 0.7 and lifted by its own offset, so the grey structure (all pHash sees)
    # stays and the mean colour moves by ~40 in red and blue.
    offsets = np.asarray([76, 38, 0], dtype=np.float32)
    recoloured = Image.fromarray(np.round(np.asarray(base, dtype=np.float32) * 0.7 + offsets).astype(np.uint8))
    whole = smooth_image(14, (200, 120))  # a painting shipped as two puzzle pieces and a board
    rcc = write_rcc(
        {
            "/puzzle/resource/board/board1_0.qml": PUZZLE_BOARD.encode(),
            "/puzzle/resource/image/left.png": encoded(whole.crop((0, 0, 100, 120)), "PNG"),
            "/puzzle/resource/image/right.png": encoded(whole.crop((100, 0, 200, 120)), "PNG"),
            "/art/painting.webp": encoded(smooth_image(3, (400, 300)), "WEBP", quality=90),
            "/art/tile.png": encoded(tile, "PNG"),
            "/art/notes.txt": b"not an image",
            "/ui/button.png": encoded(smooth_image(4, (200, 200)), "PNG"),  # in the rcc, but no rule takes it
        }
    )
    return {
        "usr/share/testimages/photos/a-scene.jpg": encoded(base, "JPEG", quality=95),
        "usr/share/testimages/photos/b-scene-brighter.png": encoded(brighter, "PNG"),  # near-duplicate of a-scene
        "usr/share/testimages/photos/bb-scene-recoloured.png": encoded(recoloured, "PNG"),  # a colour variant
        "usr/share/testimages/photos/c-icon.png": encoded(smooth_image(5, (32, 32)), "PNG"),  # too small
        "usr/share/testimages/photos/d-broken.jpg": b"\xff\xd8\xff\xe0 this is not really a jpeg",
        "usr/share/testimages/big/large.jpg": encoded(smooth_image(6, (1200, 800)), "JPEG", quality=90),
        "usr/share/testimages/cutouts/disc.png": encoded(disc, "PNG"),
        "usr/share/testimages/cutouts/drawn.png": encoded(drawn, "PNG"),
        "usr/share/testimages/patterns/weave.pat": gimp_pattern(smooth_image(7, (64, 48))),
        "usr/share/testimages/res/art.rcc": rcc,
        "usr/share/testimages/README": b"text, not taken",
    }


@pytest.fixture(scope="module")
def archives(tmp_path_factory, fixture_files) -> Path:
    directory = tmp_path_factory.mktemp("archives")
    make_deb(directory, PACKAGE, "1.0-1", fixture_files, COPYRIGHT)
    field = (np.arange(150 * 150, dtype=np.uint16).reshape(150, 150) * 7) % 4096  # a 12-bit grey image
    npz = io.BytesIO()
    np.savez(npz, data=field)
    with zipfile.ZipFile(directory / "testphotos-2.0-py3-none-any.whl", "w") as wheel:
        wheel.writestr("testphotos/__init__.py", "")
        wheel.writestr("testphotos/data/field.npz", npz.getvalue())
        wheel.writestr(
            "testphotos-2.0.dist-info/METADATA",
            "Metadata-Version: 2.4\nName: testphotos\nVersion: 2.0\nLicense-Expression: MIT\n",
        )
    return directory


def tree_bytes(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_build_from_local_archives_is_deterministic_with_complete_manifest(tmp_path, archives, fixture_files):
    cache = tmp_path / "cache"
    sources = [DEB_SOURCE, WHEEL_SOURCE]
    build(tmp_path / "one", sources, cache=cache, archives=archives, log=lambda line: None)
    build(tmp_path / "two", sources, cache=cache, archives=archives, jobs=2, log=lambda line: None)
    one, two = tree_bytes(tmp_path / "one"), tree_bytes(tmp_path / "two")
    assert one == two  # byte-identical, also with two decoding processes
    assert {"manifest.jsonl", "duplicates.jsonl", "skipped.jsonl", "summary.json"} <= set(one)

    rows = read_jsonl(tmp_path / "one/manifest.jsonl")
    assert [row["id"] for row in rows] == sorted(row["id"] for row in rows)
    by_path = {row["path"]: row for row in rows}
    assert set(by_path) == {
        "usr/share/testimages/photos/a-scene.jpg",
        "usr/share/testimages/photos/bb-scene-recoloured.png",
        "usr/share/testimages/big/large.jpg",
        "usr/share/testimages/cutouts/disc.png",
        "usr/share/testimages/cutouts/drawn.png",
        "usr/share/testimages/patterns/weave.pat",
        "usr/share/testimages/res/art.rcc!/art/painting.webp",
        "usr/share/testimages/res/art.rcc!/art/tile.png",
        "usr/share/testimages/res/art.rcc!/puzzle/resource/board/board1_0.qml",
        "testphotos/data/field.npz",
    }
    for row in rows:
        written = (tmp_path / "one" / row["file"]).read_bytes()
        assert row["file"] == f"images/{row['id']}.{'png' if row['alpha'] else 'jpg'}"
        assert row["file_sha256"] == hashlib.sha256(written).hexdigest()
        assert row["id"] == row["sha256"][:16]
        assert len(row["phash"]) == 16 and int(row["phash"], 16) >= 0
        assert row["kind"] in KINDS
        with Image.open(io.BytesIO(written)) as image:
            assert max(image.size) <= 512
            assert image.mode == ("RGBA" if row["alpha"] else "RGB")

    painting = by_path["usr/share/testimages/res/art.rcc!/art/painting.webp"]
    webp = dict(iter_rcc(fixture_files["usr/share/testimages/res/art.rcc"]))["/art/painting.webp"]
    assert painting["sha256"] == hashlib.sha256(webp).hexdigest()
    assert (painting["source"], painting["version"], painting["licence"], painting["kind"]) == (
        PACKAGE,
        "1.0-1",
        "CC0-1.0",
        "painting",
    )
    assert (painting["width"], painting["height"]) == (400, 300)

    puzzle = by_path["usr/share/testimages/res/art.rcc!/puzzle/resource/board/board1_0.qml"]
    assert (puzzle["kind"], puzzle["width"], puzzle["height"], puzzle["alpha"]) == ("painting", 200, 120, False)
    assembled = np.asarray(Image.open(tmp_path / "one" / puzzle["file"]), dtype=np.float32)
    whole = np.asarray(smooth_image(14, (200, 120)), dtype=np.float32)
    assert np.abs(assembled - whole).mean() < 3  # the pieces back in place (JPEG error only)

    large = by_path["usr/share/testimages/big/large.jpg"]
    assert (large["width"], large["height"]) == (1200, 800)
    assert Image.open(tmp_path / "one" / large["file"]).size == (512, 341)

    disc = by_path["usr/share/testimages/cutouts/disc.png"]
    assert disc["alpha"] and disc["kind"] == "cutout" and (disc["width"], disc["height"]) == (200, 200)
    with Image.open(tmp_path / "one" / disc["file"]) as written:
        assert written.size == (120, 120)  # transparent margins trimmed
        assert written.getchannel("A").getextrema() == (0, 255)
    drawn = by_path["usr/share/testimages/cutouts/drawn.png"]
    assert drawn["alpha"] and drawn["kind"] == "illustration"  # flat colours: a drawing, not a photo cut-out

    tile = by_path["usr/share/testimages/res/art.rcc!/art/tile.png"]
    assert tile["kind"] == "painting" and not tile["alpha"]
    assert Image.open(tmp_path / "one" / tile["file"]).size == (150, 160)  # the largest opaque box

    pattern = by_path["usr/share/testimages/patterns/weave.pat"]
    assert (pattern["width"], pattern["height"]) == (64, 48)  # the original tile; written as a tiled swatch
    assert Image.open(tmp_path / "one" / pattern["file"]).size == (256, 256)

    field = by_path["testphotos/data/field.npz"]
    assert (field["source"], field["version"], field["licence"]) == ("testphotos", "2.0", "MIT")

    (duplicate,) = read_jsonl(tmp_path / "one/duplicates.jsonl")
    assert duplicate["path"] == "usr/share/testimages/photos/b-scene-brighter.png"
    assert duplicate["duplicate_of_path"] == "usr/share/testimages/photos/a-scene.jpg"
    assert duplicate["duplicate_of"] == by_path["usr/share/testimages/photos/a-scene.jpg"]["id"]
    assert duplicate["distance"] <= 4 and duplicate["colour_gap"] <= 16
    scene, recoloured = (
        by_path["usr/share/testimages/photos/a-scene.jpg"],
        by_path["usr/share/testimages/photos/bb-scene-recoloured.png"],
    )
    assert bin(int(scene["phash"], 16) ^ int(recoloured["phash"], 16)).count("1") <= 4  # same shapes, kept

    skipped = {row["path"]: row["reason"] for row in read_jsonl(tmp_path / "one/skipped.jsonl")}
    assert skipped["usr/share/testimages/photos/c-icon.png"].startswith("too small: 32x32")
    assert skipped["usr/share/testimages/photos/d-broken.jpg"].startswith("undecodable:")
    assert len(skipped) == 2

    summary = json.loads((tmp_path / "one/summary.json").read_text())
    assert summary["images"] == 10 and summary["duplicates_dropped"] == 1
    assert summary["per_kind"] == {"cutout": 1, "illustration": 1, "painting": 3, "pattern": 1, "photo": 4}


def test_cli_builds_a_registry_source_from_archives_without_network(tmp_path):
    """`--archives` stands in for apt-get download: a fake scribus-template .deb at the pinned version."""
    (scribus,) = select_sources(["scribus-template"])
    archives = tmp_path / "archives"
    archives.mkdir()
    photo = encoded(smooth_image(8, (300, 200)), "JPEG", quality=90)
    make_deb(
        archives,
        "scribus-template",
        scribus.version,
        {"usr/share/scribus/templates/br2/sunset.jpg": photo, "usr/share/scribus/templates/br2/br2.png": photo},
        "Not a machine-readable copyright file.\n",
    )
    out = tmp_path / "out"
    arguments = ["build", "--out", str(out), "--sources", "scribus-template", "--archives", str(archives)]
    assert main([*arguments, "--cache", str(tmp_path / "cache")]) == 0
    (row,) = read_jsonl(out / "manifest.jsonl")
    assert row["path"] == "usr/share/scribus/templates/br2/sunset.jpg"
    assert row["licence"].startswith("public-domain")
    assert row["sha256"] == hashlib.sha256(photo).hexdigest()


@pytest.mark.parametrize(
    "name", ["openmoji", "emoji-datasource-apple", "fonts-noto-color-emoji", "lomiri-wallpapers-focal", "tuxtype-data"]
)
def test_reserved_packages_are_refused(tmp_path, capsys, name):
    assert reserved_pattern(name) is not None
    with pytest.raises(RealDataError, match="reserved"):
        select_sources([name])
    empty = tmp_path / "archives"
    empty.mkdir()
    with pytest.raises(RealDataError, match="reserved"):  # refused before anything is looked up or fetched
        build(tmp_path / "out", [Source(name, "deb", "1", rules=(Rule("photo", ("*",)),))], archives=empty)
    assert main(["build", "--out", str(tmp_path / "cli"), "--sources", name, "--archives", str(empty)]) == 2
    assert "reserved" in capsys.readouterr().err
    assert not (tmp_path / "cli").exists()


def test_unknown_source_is_refused():
    with pytest.raises(RealDataError, match="unknown source"):
        select_sources(["no-such-package"])


def test_registry_records_are_well_formed():
    names = [source.name for source in SOURCES]
    assert len(names) == len(set(names))
    for source in SOURCES:
        assert reserved_pattern(source.name) is None, source.name
        assert source.archive in ("deb", "wheel") and source.version
        assert source.rules and all(rule.kind in KINDS for rule in source.rules)


@pytest.mark.parametrize("version", [1, 2, 3])
@pytest.mark.parametrize("compress", [False, True])
def test_rcc_round_trip(version, compress):
    files = {"/a/b/one.png": b"\x89PNG one", "/a/two.webp": b"RIFF two", "/three.txt": b"3" * 100}
    data = write_rcc(files, version=version, compress=compress)
    assert dict(iter_rcc(data)) == files
    assert [path for path, _ in iter_rcc(data)] == sorted(files)


def test_rcc_rejects_other_files():
    with pytest.raises(RccError, match="qres"):
        list(iter_rcc(b"PK\x03\x04 a zip"))


def test_gimp_pattern_and_perceptual_hash():
    image = smooth_image(9, (40, 30))
    decoded = decode_gimp_pattern(gimp_pattern(image, "name"))
    assert decoded.mode == "RGB" and decoded.tobytes() == image.tobytes()
    with pytest.raises(ValueError, match="truncated"):
        decode_gimp_pattern(gimp_pattern(image)[:-10])
    one, other = smooth_image(10, (200, 150)), smooth_image(11, (200, 150))
    assert perceptual_hash(one) == perceptual_hash(one.resize((100, 75)))
    assert bin(perceptual_hash(one) ^ perceptual_hash(other)).count("1") > 10


def test_oversized_images_are_skipped_before_decoding(monkeypatch):
    import training.data.realdata as realdata

    monkeypatch.setattr(realdata, "MAX_PIXELS", 10_000)
    data = encoded(smooth_image(13, (200, 100)), "PNG")
    candidate = realdata.Candidate(0, "pkg", "1", "big.png", "photo", None, "MIT", data)
    assert realdata.prepare(candidate, max_side=512, min_side=96).skipped.startswith("too large: 200x100")
