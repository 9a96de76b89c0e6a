"""The web page in headless Chromium (Debian's), driven by Playwright against a real `omniattr up` server."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

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


@pytest.fixture
def server(tmp_path, tiny_encoder_dir, generator_dir):
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMNIATTR_")}
    env.update(
        OMNIATTR_DATA_DIR=str(tmp_path / "data"),
        OMNIATTR_ENCODER_PATH=str(tiny_encoder_dir),
        OMNIATTR_DEVICE="cpu",
        OMNIATTR_GENERATOR_PATH=str(generator_dir),
        OMNIATTR_GENERATION_STEPS="2",
        OMNIATTR_GENERATION_SIZE="64",
    )
    with running_server(env, tmp_path) as url:
        yield url


@pytest.mark.slow
def test_search_from_the_page(server, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    files = []
    for i in range(8):
        path = tmp_path / f"photo{i}.png"
        path.write_bytes(png(i, size=64))
        files.append(path)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1200, "height": 1000})
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(server)
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

        page.fill("#attribute", "pose")
        expect(page.locator("#search")).to_be_enabled()
        page.click("#search")
        expect(page.locator("#error")).to_contain_text("press Index this attribute")

        page.screenshot(path=str(ARTIFACTS / "page-search.png"), full_page=True)
        browser.close()
    assert errors == []
