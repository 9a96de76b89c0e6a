"""`make demo`: build a sample collection, index three attributes, serve the API and page on loopback.

Steps (each rerun reuses what the previous run made: images are written once, ingest skips duplicates,
index computes only missing attributes):
1. write ~300 images under data/demo/images: scikit-image's bundled photos, each in a dozen lighting, colour
   and art-style variants, plus procedurally rendered objects (training/data/procedural.py);
2. pick the encoder: the shipped starter model (models/starter/encoder) when present, otherwise an untrained
   compact encoder from `omniattr init-encoder` (with a warning: rankings then are not meaningful); the
   generator is left to the settings rule (`omniattr up` uses the shipped models/starter/generator when
   present, Settings.resolved_generator_path), and the demo says which;
3. `omniattr ingest` and `omniattr index` (embedded profile, data under data/demo/omniattr, progress bars);
4. `omniattr up` on 127.0.0.1, then print the URL and three example queries with their top results, and
   keep serving until Ctrl-C (`--check` stops the server after printing instead).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
from PIL import Image, ImageFilter, ImageOps

from omniattr.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
# `omniattr up`'s default data directory (Settings.data_dir, relative to where it is started): the demo uses the
# same folder of the checkout, so `omniattr up` or `omniattr search` run there afterwards see the demo collection.
DEFAULT_DATA_DIR = Settings.model_fields["data_dir"].default
STARTER_ENCODER = ROOT / "models" / "starter" / "encoder"
COLLECTION = "demo"
ATTRIBUTES = ("art style", "background", "color")
BUILDER_VERSION = 1  # bump when the images change, so an old data/demo/images is rebuilt
PHOTO_SIDE = 320  # longest side of a photo variant, pixels
PROCEDURAL_SIDE = 192
PROCEDURAL_COUNT = 160
PROCEDURAL_SEED = 7


# --- 1. the sample collection --------------------------------------------------------------------------


def bundled_photos() -> Iterator[tuple[str, Image.Image]]:
    """scikit-image's photos that ship inside the package (no download), as RGB images."""
    import skimage.data

    loaders: dict[str, Callable[[], np.ndarray]] = {
        "astronaut": skimage.data.astronaut,
        "cat": skimage.data.chelsea,
        "coffee": skimage.data.coffee,
        "rocket": skimage.data.rocket,
        "motorcycle": lambda: skimage.data.stereo_motorcycle()[0],
        "galaxies": skimage.data.hubble_deep_field,
        "tissue": skimage.data.immunohistochemistry,
        "retina": skimage.data.retina,
        "cameraman": skimage.data.camera,
        "coins": skimage.data.coins,
        "moon": skimage.data.moon,
        "clock": skimage.data.clock,
    }
    for name, load in loaders.items():
        image = Image.fromarray(load()).convert("RGB")
        image.thumbnail((PHOTO_SIDE, PHOTO_SIDE), Image.Resampling.LANCZOS)
        yield name, image


def _scale_channels(image: Image.Image, gains: tuple[float, float, float]) -> Image.Image:
    pixels = np.asarray(image, dtype=np.float32) * np.array(gains, dtype=np.float32)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _directional_light(image: Image.Image, direction: tuple[float, float]) -> Image.Image:
    """Brighten the side the light comes from and darken the other: a gain ramp from 0.35 to 1.3."""
    width, height = image.size
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    along = (xs / max(width - 1, 1) - 0.5) * direction[0] + (ys / max(height - 1, 1) - 0.5) * direction[1]
    ramp = 0.35 + 0.95 * (along - along.min()) / max(float(np.ptp(along)), 1e-6)  # (H, W)
    pixels = np.asarray(image, dtype=np.float32) * ramp[:, :, None]
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _hue_shift(image: Image.Image, turn: float) -> Image.Image:
    hsv = np.asarray(image.convert("HSV"), dtype=np.int16)
    hsv[:, :, 0] = (hsv[:, :, 0] + round(turn * 256)) % 256
    hsv[:, :, 1] = np.clip(hsv[:, :, 1] * 1.3, 0, 255)  # recolour greyish photos visibly too
    return Image.fromarray(hsv.astype(np.uint8), "HSV").convert("RGB")


def _tint(image: Image.Image, rgb: tuple[float, float, float]) -> Image.Image:
    """A duotone in one colour through the photo's luminance."""
    luminance = np.asarray(image.convert("L"), dtype=np.float32)[:, :, None] / 255.0
    pixels = 255.0 * (0.12 + 0.88 * luminance) * np.array(rgb, dtype=np.float32)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _pixel_art(image: Image.Image) -> Image.Image:
    small = image.resize((max(1, image.width // 10), max(1, image.height // 10)), Image.Resampling.BILINEAR)
    return ImageOps.posterize(small, 3).resize(image.size, Image.Resampling.NEAREST)


def _pencil_sketch(image: Image.Image) -> Image.Image:
    edges = image.convert("L").filter(ImageFilter.FIND_EDGES)
    return ImageOps.autocontrast(ImageOps.invert(edges)).convert("RGB")


def _oil_paint(image: Image.Image) -> Image.Image:
    return image.filter(ImageFilter.ModeFilter(7)).filter(ImageFilter.SMOOTH_MORE)


PHOTO_VARIANTS: dict[str, Callable[[Image.Image], Image.Image]] = {
    "original": lambda image: image,
    # lighting
    "warm-light": lambda image: _scale_channels(image, (1.15, 0.97, 0.7)),
    "cool-light": lambda image: _scale_channels(image, (0.75, 0.92, 1.2)),
    "dim-light": lambda image: _scale_channels(image, (0.5, 0.5, 0.5)),
    "light-from-left": lambda image: _directional_light(image, (-1.0, 0.0)),
    "light-from-top-right": lambda image: _directional_light(image, (0.7, -0.7)),
    # colour
    "hue-shifted": lambda image: _hue_shift(image, 1 / 3),
    "red-duotone": lambda image: _tint(image, (1.0, 0.25, 0.2)),
    "blue-duotone": lambda image: _tint(image, (0.2, 0.4, 1.0)),
    # art style
    "pixel-art": _pixel_art,
    "pencil-sketch": _pencil_sketch,
    "oil-paint": _oil_paint,
}


def build_collection(out: Path) -> int:
    """Write the sample images (photos/ and procedural/) and manifest.json under `out`; returns the count.

    Skipped when `out` already holds this builder version's manifest.
    """
    manifest_path = out / "manifest.json"
    if manifest_path.exists() and json.loads(manifest_path.read_text()).get("version") == BUILDER_VERSION:
        count = len(json.loads(manifest_path.read_text())["images"])
        print(f"[demo] sample collection: {count} images already in {out}")
        return count
    from tqdm import tqdm

    from training.data.procedural import render_image, sample_factors

    if out.exists():
        shutil.rmtree(out)
    (out / "photos").mkdir(parents=True)
    (out / "procedural").mkdir(parents=True)
    images: dict[str, dict[str, str]] = {}
    photos = list(bundled_photos())
    with tqdm(
        total=len(photos) * len(PHOTO_VARIANTS) + PROCEDURAL_COUNT,
        desc="[demo] building images",
        unit="img",
        file=sys.stderr,
    ) as bar:
        for name, photo in photos:
            for variant, make in PHOTO_VARIANTS.items():
                relative = f"photos/{name}__{variant}.png"
                make(photo).save(out / relative, compress_level=1)
                images[relative] = {"source": "skimage.data", "photo": name, "variant": variant}
                bar.update()
        rng = np.random.default_rng(PROCEDURAL_SEED)
        for index in range(PROCEDURAL_COUNT):
            factors = sample_factors(rng)
            relative = f"procedural/{index:04d}_{factors['color']}_{factors['category']}.png"
            render_image(factors, size=PROCEDURAL_SIDE, jitter_seed=index).save(out / relative, compress_level=1)
            images[relative] = {"source": "training.data.procedural", **factors}
            bar.update()
    manifest_path.write_text(json.dumps({"version": BUILDER_VERSION, "images": images}, indent=1))
    print(f"[demo] sample collection: {len(images)} images written to {out}")
    return len(images)


# --- 2. the encoder -----------------------------------------------------------------------------------


def choose_encoder(data_dir: Path, env: dict[str, str]) -> Path:
    """The starter model when shipped, else an untrained compact encoder under data_dir (with a warning)."""
    if (STARTER_ENCODER / "encoder_config.json").exists():
        print(f"[demo] encoder: the shipped starter model, {STARTER_ENCODER.relative_to(ROOT)}")
        return STARTER_ENCODER
    fallback = data_dir / "encoder"
    if not (fallback / "encoder_config.json").exists():
        run([omniattr(), "init-encoder", str(fallback)], env)
    print(
        "\n[demo] WARNING: models/starter/encoder is not here, so the demo uses an UNTRAINED compact encoder\n"
        "[demo]          (omniattr init-encoder). Everything runs, but rankings follow overall image\n"
        "[demo]          similarity, not the named attribute: the results below are NOT meaningful.\n",
        file=sys.stderr,
    )
    return fallback


def describe_generator() -> str:
    """The demo's line about Personalize. The demo sets no OMNIATTR_GENERATOR_PATH (demo_environment drops every
    OMNIATTR_* variable), so `omniattr up` resolves the generator by the settings rule: the shipped starter
    generator when present, else none."""
    # The defaults, without reading this process's environment (what demo_environment drops).
    generator = Settings.model_construct().resolved_generator_path
    if generator is None:
        return "[demo] generator: none (models/starter/generator is not here), so Personalize is off"
    where = generator.relative_to(ROOT) if generator.is_relative_to(ROOT) else generator
    return f"[demo] generator: the shipped starter model, {where} (tick results, type a prompt, Personalize)"


# --- 3. ingest and index ------------------------------------------------------------------------------


def omniattr() -> str:
    """The omniattr script of the Python running this file (the project's venv)."""
    script = Path(sys.executable).parent / "omniattr"
    if not script.exists():
        raise SystemExit(f"{script} not found: run `make setup` first (make demo does)")
    return str(script)


def run(command: list[str], env: dict[str, str]) -> None:
    """Run a CLI step in the foreground (its progress bars show), stopping the demo if it fails."""
    print(f"[demo] $ omniattr {shlex.join(command[1:])}", file=sys.stderr)
    result = subprocess.run(command, env=env, check=False)
    if result.returncode != 0:
        raise SystemExit(f"[demo] step failed (exit {result.returncode}): {' '.join(command)}")


def demo_environment(data_dir: Path) -> dict[str, str]:
    """This process's environment with the embedded profile under data_dir, whatever the caller had set."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("OMNIATTR_")}
    env.update(
        OMNIATTR_PROFILE="embedded", OMNIATTR_DATA_DIR=str(data_dir), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1"
    )
    return env


# --- 4. serve and show --------------------------------------------------------------------------------


@dataclass
class ExampleQuery:
    """One search to show: what it asks in words, and the request body."""

    words: str
    terms: list[tuple[str, str]]  # (image file, attribute)
    negatives: list[tuple[str, str]]


# What the shipped starter encoder does well (bench/RESULTS.md): art style and background; it was trained on
# procedural objects only, and on photos it tells art style apart but not lighting or the subject.
EXAMPLES = [
    ExampleQuery(
        "the same BACKGROUND as the teal person (a starry deep-space backdrop)",
        [("procedural/0127_teal_person.png", "background")],
        [],
    ),
    ExampleQuery("the same ART STYLE as the pixel-art horse", [("procedural/0003_purple_horse.png", "art style")], []),
    ExampleQuery(
        "the ART STYLE of the pixel-art cat photo, but NOT the cat photo's colours",
        [("photos/cat__pixel-art.png", "art style")],
        [("photos/cat__original.png", "color")],
    ),
]


def wait_for_server(url: str, server: subprocess.Popen, timeout_s: float = 300.0) -> None:
    """Poll /api/health until the server answers (model loading takes a few seconds)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"[demo] omniattr up exited with {server.returncode}; see its output above")
        try:
            if httpx.get(f"{url}/api/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"[demo] the server did not answer on {url} within {timeout_s:.0f} s")


def image_ids(client: httpx.Client, collection_id: int) -> dict[str, int]:
    """Image file (relative to the images folder) -> image id, for every ready image of the collection."""
    ids: dict[str, int] = {}
    after = 0
    while True:
        page = client.get(
            f"/api/collections/{collection_id}/images", params={"status": "ready", "after_id": after, "limit": 500}
        ).json()
        for image in page["data"]:
            source = Path(image["source"])
            ids[f"{source.parent.name}/{source.name}"] = image["id"]
        if page["next_after_id"] is None:
            return ids
        after = page["next_after_id"]


def show_examples(url: str) -> None:
    """Print the URL and the three example queries (page steps, CLI and curl) with their top results."""
    with httpx.Client(base_url=url, timeout=60) as client:
        collections = {c["name"]: c["id"] for c in client.get("/api/collections").json()["data"]}
        collection_id = collections[COLLECTION]
        ids = image_ids(client, collection_id)
        print(
            f"\n{'=' * 100}\n omniattr demo is running: open {url}  (collection '{COLLECTION}', "
            f"{len(ids)} images, attributes: {', '.join(ATTRIBUTES)})\n{'=' * 100}"
        )
        for number, example in enumerate(EXAMPLES, start=1):
            terms = [{"image_id": ids[file], "attribute": attribute} for file, attribute in example.terms]
            negatives = [{"image_id": ids[file], "attribute": attribute} for file, attribute in example.negatives]
            body = {"collection_id": collection_id, "terms": terms, "negatives": negatives, "limit": 5}
            hits = client.post("/api/search", json=body).json()["results"]
            cli = " ".join(
                [f"--term {t['image_id']}:'{t['attribute']}'" for t in terms]
                + [f"--negative {n['image_id']}:'{n['attribute']}'" for n in negatives]
            )
            on_page = "; ".join(f"click {file}, attribute '{attribute}'" for file, attribute in example.terms)
            print(f"\n{number}. Images with {example.words}")
            print(f"   page: {on_page}, Search")
            print(f"   cli:  .venv/bin/omniattr search --url {url} --collection {COLLECTION} {cli}")
            print(f"   curl: curl -s {url}/api/search -H 'content-type: application/json' -d '{json.dumps(body)}'")
            print("   top 5: " + ", ".join(f"{Path(h['image']['source']).name} ({h['score']:.2f})" for h in hits))
        print(f"\nServing {url} (Ctrl-C stops it).", flush=True)


def main(argv: list[str] | None = None) -> int:
    """Build, index, serve, show."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--dir",
        type=Path,
        default=ROOT / DEFAULT_DATA_DIR,
        help="the omniattr data directory (default: the checkout's data/, which is where `omniattr up` run from "
        "the checkout looks, so it finds the demo collection); the sample images go in its demo/images",
    )
    parser.add_argument("--port", type=int, default=int(os.environ.get("DEMO_PORT", "8000")))
    parser.add_argument("--check", action="store_true", help="stop the server after printing the examples")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    data_dir = args.dir.resolve()
    images_dir = data_dir / "demo" / "images"
    data_dir.mkdir(parents=True, exist_ok=True)
    env = demo_environment(data_dir)

    build_collection(images_dir)
    env["OMNIATTR_ENCODER_PATH"] = str(choose_encoder(data_dir, env))
    print(describe_generator())
    run([omniattr(), "ingest", str(images_dir), "--collection", COLLECTION], env)
    run([omniattr(), "index", "--collection", COLLECTION, *ATTRIBUTES], env)

    url = f"http://127.0.0.1:{args.port}"
    server = subprocess.Popen([omniattr(), "up", "--host", "127.0.0.1", "--port", str(args.port)], env=env)
    try:
        wait_for_server(url, server)
        show_examples(url)
        print(
            f"[demo] ready {time.perf_counter() - started:.0f} s after `python scripts/demo.py` started",
            file=sys.stderr,
            flush=True,
        )
        if args.check:
            return 0
        return server.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGINT)  # uvicorn shuts down cleanly and releases the data directory
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()


if __name__ == "__main__":
    sys.exit(main())
