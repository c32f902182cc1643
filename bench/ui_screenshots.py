"""Screenshots of the web page's tabs for the README (`docs/ui/*.png`): the real server with the demo bundle and a
collection of emoji images filled through the API, driven by headless Chromium as a person would use it.

    python bench/ui_screenshots.py --bundle bundles/xclip --data .cache/data/emoji-16.0.0 --out docs/ui

A second model for the Models tab (`--also BUNDLE`, repeatable) defaults to a tiny `clip` bundle trained for two
steps on the same data: it shows a hot-swap candidate and a model without clusters.
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from api_tests.conftest import Server

logger = logging.getLogger(__name__)
DESKTOP = {"width": 1280, "height": 860}
PHONE = {"width": 390, "height": 844}
TIMEOUT_MS = 120_000


def emoji_items(data: Path, count: int) -> list[dict]:
    """`count` emoji spread over the data set (every n-th), with their name and labels as metadata."""
    rows = [json.loads(line) for line in (data / "captions.jsonl").read_text().splitlines()]
    step = max(len(rows) // count, 1)
    return [{"id": Path(row["image"]).stem, "image": base64.b64encode((data / row["image"]).read_bytes()).decode(),
             "metadata": {"name": row["text"][0], **row.get("labels", {})}} for row in rows[::step][:count]]


def fill(server: Server, data: Path, count: int, also: list[Path]) -> None:
    with server.client("admin-key", timeout=300) as admin:
        for bundle in also:
            admin.post("/v1/models", json={"path": str(bundle.resolve())}).raise_for_status()
        admin.put("/v1/collections/emoji", json={"modality": "image"}).raise_for_status()
        items = emoji_items(data, count)
        for start in range(0, len(items), 128):
            admin.post("/v1/collections/emoji/items", json={"items": items[start:start + 128]}).raise_for_status()


def wait_for_thumbnails(page, grid: str) -> None:
    page.wait_for_function("""grid => { const images = [...document.querySelectorAll(`${grid} img`)];
        return images.length > 0 && images.every(i => i.complete && i.naturalWidth > 0); }""", arg=grid)


def shoot(browser, base_url: str, data: Path, out: Path) -> None:
    page = browser.new_page(viewport=DESKTOP)
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(f"{base_url}/ui")
    page.get_by_label("API key").fill("admin-key")
    page.get_by_role("button", name="Save key").click()
    search(page, "cat face", 21)
    page.locator("#search-results > li").nth(1).hover()  # metadata on hover
    page.screenshot(path=out / "search.png")
    tag(page, data / "images" / "1f63a.png")
    page.screenshot(path=out / "tag.png")
    clusters(page, "cat face")
    page.screenshot(path=out / "clusters.png", full_page=True)
    page.get_by_role("tab", name="Models & collections").click()
    page.locator("#collections-table tbody tr").first.wait_for()
    page.screenshot(path=out / "models.png")
    page.set_viewport_size(PHONE)
    page.get_by_role("tab", name="Search").click()
    search(page, "red heart", 6)
    page.locator("#search-status").scroll_into_view_if_needed()  # the results, as a phone shows them
    page.screenshot(path=out / "phone.png")


def search(page, text: str, k: int) -> None:
    page.get_by_label("Collection", exact=True).select_option("emoji")
    page.get_by_label("Results (k)").fill(str(k))
    page.get_by_label("Text query").fill(text)
    page.get_by_label("Text query").press("Enter")
    page.locator("#search-status").filter(has_text=f"“{text}”").wait_for()
    wait_for_thumbnails(page, "#search-results")


def tag(page, image: Path) -> None:
    page.get_by_role("tab", name="Tag an image").click()
    page.get_by_label("Image: drop it here, or choose one", exact=True).set_input_files(image)
    page.get_by_label("Labels from").select_option("subcategory")
    page.get_by_role("button", name="Tag", exact=True).click()
    page.locator("#tag-results tbody tr").first.wait_for()


def clusters(page, text: str) -> None:
    page.get_by_role("tab", name="Clusters").click()
    page.get_by_label("Text", exact=True).fill(text)
    page.get_by_role("button", name="Clusters of this text").click()
    page.locator("#clusters-results tbody tr button").first.click()
    page.locator("#cluster-status").filter(has_text="most probably").wait_for()
    wait_for_thumbnails(page, "#cluster-items")


def tiny_clip(data: Path, root: Path) -> Path:
    from training.testing import make_tiny_bundle

    return make_tiny_bundle(root, "clip", data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=Path("bundles/xclip"))
    parser.add_argument("--data", type=Path, default=Path(".cache/data/emoji-16.0.0"))
    parser.add_argument("--out", type=Path, default=Path("docs/ui"))
    parser.add_argument("--images", type=int, default=600, help="emoji in the collection")
    parser.add_argument("--also", type=Path, action="append", default=None, help="another bundle to register")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        also = args.also if args.also is not None else [tiny_clip(args.data, Path(tmp) / "clip")]
        server = Server(Path(tmp) / "state", args.bundle.resolve()).start()
        try:
            fill(server, args.data, args.images, also)
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=chromium, headless=True)
                shoot(browser, server.base_url, args.data, args.out)
                browser.close()
        finally:
            server.stop()
    logger.info("screenshots in %s: %s", args.out, sorted(p.name for p in args.out.glob("*.png")))


if __name__ == "__main__":
    main()
