"""Ingest of real files into a migrated database: dedup, decode checks, orientation, safe paths."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from indexer.ingest import (
    MediaStore,
    PathNotAllowed,
    check_allowed,
    decode_image,
    ingest_bytes,
    ingest_path,
    scan_directory,
)
from store import metadata


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def photo(seed: int, size=(64, 48)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture
def collection(session):
    return metadata.create_collection(session, name="ingest")


@pytest.mark.slow
def test_good_files_are_stored_and_duplicates_recognised(session, collection, tmp_path):
    media = MediaStore(tmp_path / "media")
    data = encode(photo(1), "JPEG")
    first = ingest_bytes(session, media, collection_id=collection.id, source="a.jpg", data=data)
    again = ingest_bytes(session, media, collection_id=collection.id, source="copy-of-a.jpg", data=data)
    assert (first.status, first.created) == ("ready", True)
    assert (again.image_id, again.created) == (first.image_id, False)
    image = metadata.get_image(session, image_id=first.image_id)
    assert (image.width, image.height, image.format) == (64, 48, "JPEG")
    original = media.original_path(image.sha256, "JPEG")
    assert original.read_bytes() == data
    with Image.open(media.thumbnail_path(image.sha256)) as thumbnail:
        assert max(thumbnail.size) <= 256


@pytest.mark.parametrize(
    ("name", "make_data", "reason"),
    [
        ("notes.jpg", lambda: b"this is a text file, not a JPEG", "not an image file"),
        ("empty.png", lambda: b"", "empty file"),
        ("cut.jpg", lambda: encode(photo(2, (256, 256)), "JPEG")[:700], "corrupt or truncated"),
        ("bomb.png", lambda: encode(Image.new("1", (9000, 9000)), "PNG"), "decompression bomb"),
    ],
)
@pytest.mark.slow
def test_bad_files_fail_alone_with_a_reason(session, collection, tmp_path, name, make_data, reason):
    media = MediaStore(tmp_path / "media")
    bad = ingest_bytes(session, media, collection_id=collection.id, source=name, data=make_data())
    good = ingest_bytes(session, media, collection_id=collection.id, source="ok.png", data=encode(photo(3), "PNG"))
    assert bad.status == "failed" and reason in bad.error
    assert good.status == "ready"
    assert metadata.get_image(session, image_id=bad.image_id).error == bad.error
    assert len(list((tmp_path / "media" / "originals").rglob("*.*"))) == 1  # only the good file is kept
    assert metadata.count_images(session, collection_id=collection.id, status="ready") == 1


def test_exif_orientation_is_applied():
    image = photo(4, (60, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    decoded = decode_image(encode(image, "JPEG", exif=exif))
    assert (decoded.width, decoded.height) == (30, 60)


@pytest.mark.parametrize(
    "image",
    [
        Image.new("RGBA", (8, 8), (255, 0, 0, 0)),  # fully transparent red -> white
        Image.new("LA", (8, 8), (0, 0)),
        Image.new("P", (8, 8)),
        Image.new("L", (8, 8), 7),
        Image.new("CMYK", (8, 8), (0, 255, 0, 0)),
        Image.fromarray(np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000),  # 16-bit
    ],
    ids=["RGBA", "LA", "P", "L", "CMYK", "I;16"],
)
def test_every_mode_becomes_rgb(image):
    fmt = "TIFF" if image.mode in ("CMYK", "I;16") else "PNG"
    decoded = decode_image(encode(image, fmt))
    assert decoded.image.mode == "RGB" and decoded.image.size == (8, 8)
    if image.mode == "RGBA":
        assert decoded.image.getpixel((0, 0)) == (255, 255, 255)


def test_paths_outside_allowed_roots_are_refused(session, collection, tmp_path):
    root, outside = tmp_path / "photos", tmp_path / "secret"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    (root / "sub" / "b.png").write_bytes(encode(photo(5), "PNG"))
    (root / "a.jpg").write_bytes(encode(photo(6), "JPEG"))
    (root / "readme.txt").write_text("not scanned")
    (outside / "private.jpg").write_bytes(encode(photo(7), "JPEG"))
    (root / "link.jpg").symlink_to(outside / "private.jpg")

    found = list(scan_directory(root, [root]))
    assert [(p.name, reason) for p, reason in found] == [
        ("a.jpg", None),
        ("link.jpg", "symlink leads outside the allowed roots; refused"),
        ("b.png", None),
    ]
    with pytest.raises(PathNotAllowed, match="outside the allowed roots"):
        list(scan_directory(outside, [root]))
    with pytest.raises(PathNotAllowed, match="OMNIATTR_ALLOWED_ROOTS"):
        check_allowed(root, [])
    with pytest.raises(PathNotAllowed):
        ingest_path(
            session,
            MediaStore(tmp_path / "m"),
            collection_id=collection.id,
            path=root / "link.jpg",
            allowed_roots=[root],
        )
    with pytest.raises(PathNotAllowed):
        check_allowed(root / ".." / "secret" / "private.jpg", [root])
    outcome = ingest_path(
        session, MediaStore(tmp_path / "m"), collection_id=collection.id, path=root / "a.jpg", allowed_roots=[root]
    )
    assert outcome.status == "ready"


def test_oversized_file_is_rejected_without_reading_it(session, collection, tmp_path):
    big = tmp_path / "big.png"
    big.write_bytes(encode(photo(8), "PNG"))
    outcome = ingest_path(
        session,
        MediaStore(tmp_path / "m"),
        collection_id=collection.id,
        path=big,
        allowed_roots=[tmp_path],
        max_bytes=100,
    )
    assert outcome.status == "failed" and "over the limit of 100" in outcome.error
