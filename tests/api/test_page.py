"""The web page in headless Chromium (Debian's), driven by Playwright against a real `omniattr up` server."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from omniattr.domain import DEFAULT_KEEP_DETAIL
from tests.api.conftest import png, running_server

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "tests" / "artifacts"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def server_env(tmp_path: Path, **settings: str) -> dict[str, str]:
    """This process's environment without any OMNIATTR_ setting, plus a fresh data directory and `settings`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMNIATTR_")}
    env.update(OMNIATTR_DATA_DIR=str(tmp_path / "data"), OMNIATTR_DEVICE="cpu", **settings)
    return env


@contextmanager
def browser_page(url: str, width: int, height: int) -> Iterator[tuple[object, list[str]]]:
    """A headless Chromium page opened at `url`, and the list its uncaught script errors are collected into."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(url)
            yield page, errors
        finally:
            browser.close()


def photo_files(tmp_path: Path, count: int, size: int) -> list[Path]:
    """`count` distinct PNG photos of `size` px written under tmp_path."""
    files = []
    for i in range(count):
        path = tmp_path / f"photo{i}.png"
        path.write_bytes(png(i, size=size))
        files.append(path)
    return files


def create_and_upload(page, name: str, files: list[Path], timeout_ms: int = 5_000) -> None:
    """Create collection `name` on the page and upload `files` into it; wait for their tiles."""
    from playwright.sync_api import expect

    page.fill("#new-collection", name)
    page.click("#create-collection")
    expect(page.locator("#collection")).to_contain_text(f"{name} (0)")
    page.set_input_files("#upload", [str(p) for p in files])
    expect(page.locator("#grid .tile")).to_have_count(len(files), timeout=timeout_ms)


def index_and_search(page, attribute: str, results: int, timeout_ms: int) -> None:
    """Index `attribute` on the page, query with the first tile and wait for `results` result tiles."""
    from playwright.sync_api import expect

    page.fill("#attribute", attribute)
    page.click("#index-attribute")
    expect(page.locator("#jobs li[data-status=done]")).to_have_count(1, timeout=timeout_ms)
    page.locator("#grid .tile").first.click()
    page.click("#search")
    expect(page.locator("#results .tile")).to_have_count(results)


@pytest.fixture
def server(tmp_path, tiny_encoder_dir, generator_dir):
    env = server_env(
        tmp_path,
        OMNIATTR_ENCODER_PATH=str(tiny_encoder_dir),
        OMNIATTR_GENERATOR_PATH=str(generator_dir),
        OMNIATTR_GENERATION_STEPS="2",
        OMNIATTR_GENERATION_SIZE="64",
    )
    with running_server(env, tmp_path) as url:
        yield url


@pytest.mark.slow
def test_search_from_the_page(server, tmp_path):
    from playwright.sync_api import expect

    files = photo_files(tmp_path, 8, size=64)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with browser_page(server, 1200, 1000) as (page, errors):
        expect(page.locator("#collection-info")).to_contain_text("No collection yet")

        page.fill("#new-collection", "holiday")
        page.click("#create-collection")
        expect(page.locator("#collection")).to_contain_text("holiday (0)")
        page.set_input_files("#upload", [str(p) for p in files])
        expect(page.locator("#grid .tile")).to_have_count(8)
        # Creating and uploading both reselect the collection; when two selections overlap, only the newer
        # one fills the grid (the older one used to append its page as well: 16 tiles in one CI run).
        collection_id = page.eval_on_selector("#collection", "select => Number(select.value)")
        page.evaluate("id => Promise.all([selectCollection(id), selectCollection(id)])", collection_id)
        assert page.locator("#grid .tile").count() == 8

        page.fill("#attribute", "lighting")
        expect(page.locator("#index-attribute")).to_be_visible()
        page.click("#index-attribute")
        expect(page.locator("#jobs li[data-status=done]")).to_have_count(1, timeout=60_000)
        expect(page.locator("#collection-info")).to_contain_text("indexed attributes: lighting")

        page.locator("#grid .tile").first.click()
        expect(page.locator("#grid .tile.query")).to_have_count(1)
        page.click("#search")
        expect(page.locator("#results .tile")).to_have_count(7)  # every other image, ranked
        expect(page.locator("#collection")).to_contain_text("holiday (8)")
        scores = [float(t.split(" ")[-1]) for t in page.locator("#results .score").all_inner_texts()]
        assert scores == sorted(scores, reverse=True)
        expect(page.locator("#results-info")).to_contain_text("ranked by lighting")

        # One click: tick two results, type a prompt, Personalize; the image and its transfer scores appear.
        expect(page.locator("#generate-panel")).to_be_visible()
        page.locator("#results .tile input[type=checkbox]").nth(0).check()
        page.locator("#results .tile input[type=checkbox]").nth(1).check()
        page.fill("#prompt", "a cup on a table")
        page.click("#personalize")
        expect(page.locator("#transfer-scores li")).to_have_count(2, timeout=120_000)
        expect(page.locator("#transfer-scores")).to_contain_text("lighting")
        expect(page.locator("#generation img")).to_have_js_property("naturalWidth", 64)
        page.screenshot(path=str(ARTIFACTS / "page-personalize.png"), full_page=True)

        # Apply to my image: the query image as the base at strength 0.4, then an uploaded file as the base.
        # The caption is built from the generation's recorded request, so it shows what the server stored.
        # By default the output keeps the base's detail (DEFAULT_KEEP_DETAIL); unticked, the generator's output.
        expect(page.locator("#strength")).to_be_disabled()  # text to image until a base is chosen
        expect(page.locator("#keep-detail")).to_be_disabled()
        query_id = page.eval_on_selector("#grid .tile.query", "tile => tile.dataset.imageId")
        page.select_option("#base", f"image:{query_id}")
        expect(page.locator("#strength")).to_be_enabled()
        expect(page.locator("#keep-detail")).to_be_checked()
        page.fill("#strength", "0.4")
        expect(page.locator("#strength-value")).to_have_text("0.40")
        page.click("#personalize")
        expect(page.locator("#generation-base")).to_have_text(
            f"Applied to image {query_id} at strength 0.4, its detail kept ({DEFAULT_KEEP_DETAIL:g} px).",
            timeout=120_000,
        )
        expect(page.locator("#generation img")).to_have_js_property("naturalWidth", 64)
        mine = tmp_path / "mine.png"
        mine.write_bytes(png(50, size=96))
        page.set_input_files("#base-upload", str(mine))
        expect(page.locator("#base")).to_have_value("upload")
        page.uncheck("#keep-detail")
        page.click("#personalize")
        expect(page.locator("#generation-base")).to_have_text(
            "Applied to the uploaded image at strength 0.4, the generator's output as is.", timeout=120_000
        )
        expect(page.locator("#generation img")).to_have_js_property("naturalWidth", 64)
        expect(page.locator("#transfer-scores li")).to_have_count(2)
        page.screenshot(path=str(ARTIFACTS / "page-apply-to-my-image.png"), full_page=True)

        page.fill("#attribute", "pose")
        expect(page.locator("#search")).to_be_enabled()
        page.click("#search")
        expect(page.locator("#error")).to_contain_text("press Index this attribute")

        page.screenshot(path=str(ARTIFACTS / "page-search.png"), full_page=True)
    assert errors == []


@pytest.fixture
def server_with_broken_generator(tmp_path, tiny_encoder_dir):
    from tests.api.test_first_hour import broken_generator

    env = server_env(
        tmp_path,
        OMNIATTR_ENCODER_PATH=str(tiny_encoder_dir),
        OMNIATTR_GENERATOR_PATH=str(broken_generator(tmp_path)),
    )
    with running_server(env, tmp_path) as url:
        yield url


@pytest.mark.slow
def test_first_hour_on_the_page(server_with_broken_generator, tmp_path):
    """Banner in view, named tiles with a larger view, results cleared on switching, a failed generation shown
    failed with its job's bar not drawn full."""
    from playwright.sync_api import expect

    files = photo_files(tmp_path, 8, size=64)
    with browser_page(server_with_broken_generator, 1000, 600) as (page, errors):
        create_and_upload(page, "first", files)

        # tiles are named and open a larger view (the original)
        expect(page.locator("#grid .tile .name").first).to_have_text("photo0.png")
        page.locator("#grid .tile .open").first.click()
        expect(page.locator("#viewer")).to_be_visible()
        expect(page.locator("#viewer-image")).to_have_js_property("naturalWidth", 64)
        expect(page.locator("#viewer-caption")).to_contain_text("photo0.png")
        page.click("#viewer-close")
        expect(page.locator("#viewer")).to_be_hidden()

        index_and_search(page, "lighting", results=7, timeout_ms=60_000)

        # a failed generation: shown failed, the spinner text gone, its job's bar not full
        page.locator("#results .tile input[type=checkbox]").nth(0).check()
        page.fill("#prompt", "a cup on a table")
        page.click("#personalize")
        expect(page.locator("#generation")).to_contain_text("Generation failed:", timeout=120_000)
        expect(page.locator("#generation")).not_to_contain_text("Generating...")
        failed_bar = page.locator("#jobs li[data-status=failed] progress")
        expect(failed_bar).to_have_count(1, timeout=30_000)
        assert failed_bar.evaluate("bar => bar.value") < failed_bar.evaluate("bar => bar.max")

        # the error banner is in view where the user is, at the top of the page too
        page.evaluate("window.scrollTo(0, 0)")
        page.fill("#attribute", "pose")
        page.click("#search")
        expect(page.locator("#error")).to_contain_text("press Index this attribute")
        expect(page.locator("#error")).to_be_in_viewport()

        # switching collections clears the previous one's results
        page.fill("#new-collection", "second")
        page.click("#create-collection")
        expect(page.locator("#collection")).to_contain_text("second (0)")
        expect(page.locator("#results .tile")).to_have_count(0)
        expect(page.locator("#results-panel")).to_be_hidden()
        page.screenshot(path=str(ARTIFACTS / "page-first-hour.png"), full_page=True)
    assert errors == []


@pytest.fixture
def server_with_shipped_models(tmp_path):
    """`omniattr up` as on a fresh clone: no encoder or generator setting, so the shipped starters are used."""
    with running_server(server_env(tmp_path), tmp_path) as url:
        yield url


@pytest.mark.slow
def test_personalize_and_apply_to_my_image_with_the_shipped_generator(server_with_shipped_models, tmp_path):
    from playwright.sync_api import expect

    files = photo_files(tmp_path, 6, size=128)
    with browser_page(server_with_shipped_models, 1200, 1000) as (page, errors):
        create_and_upload(page, "mine", files, timeout_ms=30_000)
        index_and_search(page, "lighting", results=5, timeout_ms=120_000)

        # The Personalize section shows with no setting: the shipped generator is on.
        expect(page.locator("#generate-panel")).to_be_visible()
        page.locator("#results .tile input[type=checkbox]").nth(0).check()
        page.fill("#prompt", "a photo")
        page.click("#personalize")
        expect(page.locator("#generation img")).to_have_js_property("naturalWidth", 128, timeout=180_000)
        expect(page.locator("#generation-base")).to_have_text("Made from noise (text to image).")

        query_id = page.eval_on_selector("#grid .tile.query", "tile => tile.dataset.imageId")
        page.select_option("#base", f"image:{query_id}")
        page.fill("#strength", "0.6")
        page.click("#personalize")
        expect(page.locator("#generation-base")).to_have_text(
            f"Applied to image {query_id} at strength 0.6, its detail kept ({DEFAULT_KEEP_DETAIL:g} px).",
            timeout=180_000,
        )
        expect(page.locator("#generation img")).to_have_js_property("naturalWidth", 128)
        page.screenshot(path=str(ARTIFACTS / "page-shipped-generator.png"), full_page=True)
    assert errors == []
