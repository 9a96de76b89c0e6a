"""Ingest of image files: safe paths, decode checks, content-addressed originals, thumbnails, rows.

Read (bytes from a path or an upload) -> check (decode, orient, measure; pure) -> write (media files and
an image row). A file that fails any check is recorded as a failed image with the reason and never stops
the others.
"""

from __future__ import annotations

import errno
import hashlib
import io
import math
import os
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError
from sqlalchemy.orm import Session

from omniattr.domain import ImageStatus
from store import metadata
from store.diskspace import DiskReserve
from store.errors import InsufficientStorageError, InvalidInputError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"})
DEFAULT_MAX_PIXELS = 64_000_000  # 8000 x 8000; larger is treated as a decompression bomb
DEFAULT_MAX_BYTES = 100 * 1024 * 1024
THUMBNAIL_SIZE = 256
TEMPORARY_PREFIX = ".tmp-"  # atomic writes go through such a file in the target's directory
STALE_TEMPORARY_S = 600  # a temporary file this old belongs to a process that died mid-write
# The longest side kept after decoding: thumbnails are 256 px and the encoder reads a few hundred, so a larger
# image is decoded at a reduced scale (JPEG: in the decoder, before any full-size raster exists) or reduced at
# once after loading, and no full-size conversion (e.g. 16-bit -> float) ever runs.
DECODE_SIDE = 2048
# At most this many decodes run at once in a process, so concurrent uploads cannot stack full-size rasters.
DECODE_SLOTS = threading.BoundedSemaphore(2)
_TRANSPOSE_BY_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
SUFFIX_BY_FORMAT = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif", "BMP": ".bmp", "TIFF": ".tif"}


def media_type(file_format: str) -> str:
    """The Content-Type of a stored original: the MIME type of the format its bytes decoded as."""
    return Image.MIME.get(file_format, "application/octet-stream")


class ImageRejected(Exception):
    """A file is not a usable image; the message is the reason recorded on its row."""


class PathNotAllowed(InvalidInputError):
    """A path lies outside every allowed root (directly or through a symlink)."""


@dataclass(frozen=True)
class DecodedImage:
    """A decoded image, EXIF orientation applied, in RGB, with the size and format of the file."""

    image: Image.Image
    width: int
    height: int
    format: str


@dataclass(frozen=True)
class IngestOutcome:
    """What happened to one file."""

    source: str
    image_id: int
    created: bool  # False: the same content was already in the collection
    status: ImageStatus  # ready or failed
    error: str | None = None


def sha256_hex(data: bytes) -> str:
    """Content hash used for dedup and content-addressed storage."""
    return hashlib.sha256(data).hexdigest()


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> DecodedImage:
    """Decode an image within the pixel budget: corrupt, truncated, non-image or bomb-sized input is rejected;
    `width`/`height` are the file's (EXIF orientation applied), `image` at most DECODE_SIDE on its longer side."""
    if not data:
        raise ImageRejected("empty file")
    try:
        with DECODE_SLOTS, warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            opened = Image.open(io.BytesIO(data))
            width, height = opened.size  # header only: checked before any pixel is decoded
            if width * height > max_pixels:
                raise ImageRejected(
                    f"image is {width}x{height} = {width * height:,} pixels, over the limit of {max_pixels:,} "
                    "(possible decompression bomb); downscale it first"
                )
            file_format = opened.format or "UNKNOWN"
            transpose = _TRANSPOSE_BY_ORIENTATION.get(opened.getexif().get(0x0112, 1))
            if max(width, height) > DECODE_SIDE:
                opened.draft(opened.mode, (DECODE_SIDE, DECODE_SIDE))  # JPEG: decode at 1/2, 1/4 or 1/8 scale
            opened.load()
            reduced = _reduce(opened, DECODE_SIDE)
            oriented = reduced.transpose(transpose) if transpose is not None else reduced
    except ImageRejected:
        raise
    except UnidentifiedImageError:
        raise ImageRejected("not an image file (no known image format recognised)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageRejected(f"decompression bomb refused: {error}") from None
    except (OSError, SyntaxError, ValueError) as error:  # PIL's errors for truncated/corrupt data
        raise ImageRejected(f"corrupt or truncated image: {error}") from None
    if transpose in (
        Image.Transpose.TRANSPOSE,
        Image.Transpose.ROTATE_270,
        Image.Transpose.TRANSVERSE,
        Image.Transpose.ROTATE_90,
    ):
        width, height = height, width
    return DecodedImage(image=_to_rgb(oriented), width=width, height=height, format=file_format)


def _reduce(image: Image.Image, side: int) -> Image.Image:
    """`image` shrunk by a whole factor until its longer side is at most `side` (unchanged when it already is)."""
    factor = math.ceil(max(image.size) / side)
    if factor <= 1:
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "P", "1"):  # modes `reduce` lacks: nearest keeps palettes exact
        size = (max(1, image.width // factor), max(1, image.height // factor))
        return image.resize(size, Image.Resampling.NEAREST)
    return image.reduce(factor)


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB for every mode: alpha composited on white, 16-bit and float scaled, palettes expanded."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        import numpy as np

        array = np.asarray(image, dtype=np.float64)
        low, high = float(array.min()), float(array.max())
        scaled = (array - low) / (high - low) * 255.0 if high > low else np.zeros_like(array)
        return Image.fromarray(scaled.astype(np.uint8), mode="L").convert("RGB")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")


class MediaStore:
    """Originals and thumbnails under one directory, addressed by content hash (shared across collections).

    Every write first checks that at least `reserve_bytes` stay free on the disk, and a write that fails
    anyway (disk full) leaves no temporary file behind; both raise InsufficientStorageError.
    """

    def __init__(self, root: Path, *, reserve_bytes: int = 0):
        self.root = Path(root)
        self.disk = DiskReserve(self.root, reserve_bytes, "the media directory")

    def original_path(self, sha256: str, file_format: str) -> Path:
        return self.root / "originals" / sha256[:2] / f"{sha256}{SUFFIX_BY_FORMAT.get(file_format, '.img')}"

    def thumbnail_path(self, sha256: str) -> Path:
        return self.root / "thumbnails" / sha256[:2] / f"{sha256}.jpg"

    def ensure_free(self, nbytes: int) -> None:
        """InsufficientStorageError unless `nbytes` can be written and leave the reserve free."""
        self.disk.ensure_free(nbytes)

    def write_file(self, path: Path, data: bytes) -> None:
        """Write `data` to `path` atomically (readers never see half a file), after the free-space check."""
        self.ensure_free(len(data))
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary: Path | None = None
        try:
            with tempfile.NamedTemporaryFile(dir=path.parent, delete=False, prefix=TEMPORARY_PREFIX) as handle:
                temporary = Path(handle.name)
                handle.write(data)
            os.replace(temporary, path)
        except OSError as error:
            if temporary is not None:
                temporary.unlink(missing_ok=True)
            if error.errno in (errno.ENOSPC, errno.EDQUOT):
                raise InsufficientStorageError(self.disk.message()) from None
            raise

    def put_original(self, data: bytes, sha256: str, file_format: str) -> Path:
        """Write the original once (atomically); an existing copy is kept."""
        path = self.original_path(sha256, file_format)
        if not path.exists():
            self.write_file(path, data)
        return path

    def put_thumbnail(self, image: Image.Image, sha256: str, size: int = THUMBNAIL_SIZE) -> Path:
        """Write a JPEG thumbnail whose longer side is at most `size`."""
        path = self.thumbnail_path(sha256)
        if not path.exists():
            thumbnail = image.copy()
            thumbnail.thumbnail((size, size), Image.Resampling.LANCZOS)
            buffer = io.BytesIO()
            thumbnail.save(buffer, format="JPEG", quality=85)
            self.write_file(path, buffer.getvalue())
        return path

    def sweep_temporary_files(self, *, older_than_s: float = STALE_TEMPORARY_S) -> int:
        """Delete temporary files left by writers that died mid-write; returns how many. Called at start-up."""
        if not self.root.is_dir():
            return 0
        cutoff = time.time() - older_than_s
        removed = 0
        for temporary in self.root.rglob(f"{TEMPORARY_PREFIX}*"):
            try:
                if temporary.is_file() and temporary.stat().st_mtime < cutoff:
                    temporary.unlink()
                    removed += 1
            except FileNotFoundError:  # another process swept it first
                continue
        return removed


def check_allowed(path: Path, allowed_roots: Sequence[Path]) -> Path:
    """The resolved path if it (after following symlinks) lies inside an allowed root, else PathNotAllowed."""
    if not allowed_roots:
        raise PathNotAllowed(
            "ingest from a path is disabled: no allowed roots are configured (set OMNIATTR_ALLOWED_ROOTS)"
        )
    if "\x00" in str(path):
        raise PathNotAllowed(f"{str(path)!r} contains a NUL character; no file has such a name")
    resolved = Path(path).resolve()
    for root in allowed_roots:
        if resolved.is_relative_to(Path(root).resolve()):
            return resolved
    roots = ", ".join(str(r) for r in allowed_roots)
    raise PathNotAllowed(f"{path} is outside the allowed roots ({roots}); move it there or add its directory")


def scan_directory(directory: Path, allowed_roots: Sequence[Path]) -> Iterator[tuple[Path, str | None]]:
    """Image files under `directory`, recursively, in sorted order: (path, None) or (path, refusal reason)."""
    top = check_allowed(directory, allowed_roots)
    if not top.is_dir():
        raise InvalidInputError(f"{directory} is not a directory")
    for current, dirnames, filenames in os.walk(top, followlinks=False):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(current) / name
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                check_allowed(path, allowed_roots)
            except PathNotAllowed:
                yield path, "symlink leads outside the allowed roots; refused"
                continue
            yield path, None


def ingest_bytes(
    session: Session,
    media: MediaStore,
    *,
    collection_id: int,
    source: str,
    data: bytes,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> IngestOutcome:
    """Check one file and record it: a ready image with its media, or a failed one with the reason."""
    sha256 = sha256_hex(data)
    existing = metadata.find_image(session, collection_id=collection_id, sha256=sha256)
    if existing is not None:
        return IngestOutcome(source, existing.id, False, existing.status, existing.error)
    try:
        if len(data) > max_bytes:
            raise ImageRejected(f"file is {len(data):,} bytes, over the limit of {max_bytes:,}")
        decoded = decode_image(data, max_pixels=max_pixels)
    except ImageRejected as rejected:
        image, created = metadata.add_image(
            session,
            collection_id=collection_id,
            source=source,
            sha256=sha256,
            bytes=len(data),
            status=ImageStatus.FAILED,
            error=str(rejected),
        )
        return IngestOutcome(source, image.id, created, image.status, image.error)
    media.put_original(data, sha256, decoded.format)
    media.put_thumbnail(decoded.image, sha256)
    image, created = metadata.add_image(
        session,
        collection_id=collection_id,
        source=source,
        sha256=sha256,
        bytes=len(data),
        width=decoded.width,
        height=decoded.height,
        format=decoded.format,
        status=ImageStatus.READY,
    )
    return IngestOutcome(source, image.id, created, image.status, image.error)


def ingest_path(
    session: Session,
    media: MediaStore,
    *,
    collection_id: int,
    path: Path,
    allowed_roots: Sequence[Path],
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> IngestOutcome:
    """Ingest one file from disk, re-checking that it is inside an allowed root."""
    resolved = check_allowed(path, allowed_roots)
    size = resolved.stat().st_size
    if size > max_bytes:  # do not read a huge file just to reject it
        sha256 = hashlib.sha256(f"oversized:{resolved}:{size}".encode()).hexdigest()
        image, created = metadata.add_image(
            session,
            collection_id=collection_id,
            source=str(path),
            sha256=sha256,
            bytes=size,
            status=ImageStatus.FAILED,
            error=f"file is {size:,} bytes, over the limit of {max_bytes:,}",
        )
        return IngestOutcome(str(path), image.id, created, image.status, image.error)
    return ingest_bytes(
        session,
        media,
        collection_id=collection_id,
        source=str(path),
        data=resolved.read_bytes(),
        max_pixels=max_pixels,
        max_bytes=max_bytes,
    )
