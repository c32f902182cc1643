"""The web page (`GET /ui`) in a real browser: headless Chromium (Debian's `chromium` package) driven by
Playwright, against the real server with tiny bundles and a small image collection filled through the API.

Each test is a flow a person does, found by the labels and roles a person (or a screen reader) would use, and
checked against the API's own answer to the same request. Every wait is a DOM condition (Playwright's `expect`
auto-waits), never a sleep: these run on a loaded 2-core machine."""

from __future__ import annotations

import io
import json
import re
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import Page, expect, sync_playwright

from api_tests.conftest import Server
from api_tests.helpers import image_b64, shape_images
from xclip_serve.demo import example_commands

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
TIMEOUT_MS = 60_000  # generous: only ever spent waiting for a DOM condition
UI_DIR = Path(__file__).resolve().parent.parent / "service" / "ui"
MAX_IMAGE_BYTES = 4096  # the swap server's upload limit, to see the page refuse a larger file before sending it


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"the browser tests need Chromium and found none at {CHROMIUM}: install it with "
                    "`apt-get install -y chromium` (Debian; .ci/run does this)", pytrace=False)
    expect.set_options(timeout=TIMEOUT_MS)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    """A fresh browser context (empty local storage); fails the test on an uncaught script error or a
    Content-Security-Policy violation, either of which a person would only see as a dead page."""
    context = browser.new_context(viewport={"width": 1200, "height": 900}, accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    problems = []
    page.on("pageerror", lambda error: problems.append(f"uncaught: {error}"))
    page.on("console", lambda message: "Content Security Policy" in message.text
            and problems.append(message.text))
    yield page
    context.close()
    assert not problems, problems


@pytest.fixture(scope="module")
def filled(server, shapes) -> list[Path]:
    """Collection `shapes`: every shape image with its colour and shape as metadata."""
    paths = shape_images(shapes)
    with server.client("admin-key") as admin:
        admin.put("/v1/collections/shapes", json={"modality": "image"}).raise_for_status()
        items = [{"id": p.stem, "image": image_b64(p),
                  "metadata": {"colour": p.stem.split("-")[0], "shape": p.stem.split("-")[1]}} for p in paths]
        admin.post("/v1/collections/shapes/items", json={"items": items}).raise_for_status()
    return paths


@pytest.fixture(scope="module")
def swap_server(tmp_path_factory, bundles, shapes):
    """A server of its own for hot swaps: xclip active, a second xclip and a clip model registered, a small
    collection to re-embed, and a small upload limit."""
    server = Server(tmp_path_factory.mktemp("ui-swap") / "state", bundles["xclip"],
                    {"XCLIP_MAX_IMAGE_BYTES": str(MAX_IMAGE_BYTES)}).start()
    with server.client("admin-key") as admin:
        for name in ("xclip-b", "clip"):
            admin.post("/v1/models", json={"path": str(bundles[name])}).raise_for_status()
        admin.put("/v1/collections/few", json={"modality": "image"}).raise_for_status()
        items = [{"id": p.stem, "image": image_b64(p)} for p in shape_images(shapes, 8)]
        admin.post("/v1/collections/few/items", json={"items": items}).raise_for_status()
    yield server
    server.stop()


def open_page(page: Page, server: Server, key: str = "reader-key", query: str = "") -> None:
    """Open the page and type the key once, as a person does."""
    page.goto(f"{server.base_url}/ui{query}")
    page.get_by_label("API key").fill(key)
    page.get_by_role("button", name="Save key").click()


def tab(page: Page, name: str) -> None:
    page.get_by_role("tab", name=name).click()


def grid_ids(page: Page, grid: str) -> list[str]:
    """The item ids a grid shows, once each of its thumbnails has loaded."""
    page.wait_for_function("""grid => { const images = [...document.querySelectorAll(`${grid} img`)];
        return images.length > 0 && images.every(i => i.complete && i.naturalWidth > 0); }""", arg=grid)
    return page.locator(f"{grid} > li").evaluate_all("items => items.map(i => i.dataset.id)")


def api_search(server: Server, **body) -> list[str]:
    with server.client("reader-key") as client:
        response = client.post("/v1/collections/shapes/search", json=body)
    response.raise_for_status()
    return [hit["id"] for hit in response.json()["results"]]


def text_search(page: Page, text: str, k: int = 6) -> None:
    page.get_by_label("Collection", exact=True).select_option("shapes")
    page.get_by_label("Results (k)").fill(str(k))
    page.get_by_label("Text query").fill(text)
    page.get_by_label("Text query").press("Enter")


def noise_png(side: int) -> bytes:
    """A PNG that does not compress: about 3 × side² bytes."""
    pixels = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def drop_file(page: Page, zone: str, path: Path) -> None:
    """Drop `path` on the drop zone `zone`, as a drag from the desktop does (a real `drop` event with a file)."""
    data = page.evaluate_handle("""([b64, name]) => {
        const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
        const transfer = new DataTransfer();
        transfer.items.add(new File([bytes], name, {type: "image/png"}));
        return transfer; }""", [image_b64(path), path.name])
    page.dispatch_event(zone, "drop", {"dataTransfer": data})


# -- the page itself ----------------------------------------------------------------------------------------------
def test_the_page_loads_without_a_key_under_a_strict_policy(server):
    page = httpx.get(f"{server.base_url}/ui")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    for directive in ("script-src 'self'", "style-src 'self'", "connect-src 'self'", "frame-ancestors 'none'"):
        assert directive in policy, policy
    assert "unsafe" not in policy and page.headers["x-content-type-options"] == "nosniff"
    assets = [(p.name, "text/javascript") for p in UI_DIR.glob("*.js")] + [("style.css", "text/css")]
    for asset, media_type in assets:
        response = httpx.get(f"{server.base_url}/ui/{asset}")
        assert response.status_code == 200 and response.headers["content-type"].startswith(media_type), asset
        assert response.headers["content-security-policy"] == policy
    assert httpx.get(f"{server.base_url}/", follow_redirects=False).headers["location"] == "/ui"
    assert httpx.get(f"{server.base_url}/ui/limits.json").json()["max_image_bytes"] == 10 * 1024 * 1024
    assert httpx.get(f"{server.base_url}/ui/..%2Fapp.py").status_code == 404
    assert httpx.get(f"{server.base_url}/v1/models").status_code == 401  # the API is as closed as before
    paths = httpx.get(f"{server.base_url}/openapi.json").json()["paths"]
    assert not [path for path in paths if path == "/" or path.startswith("/ui")]


def test_the_page_has_no_inline_script_or_handler():
    """What the policy forbids is also absent from the source, so no control depends on a blocked script."""
    html = (UI_DIR / "index.html").read_text()
    assert not re.search(r"<script(?![^>]*\bsrc=)", html)
    assert not re.search(r"\son[a-z]+\s*=", html)
    for script in UI_DIR.glob("*.js"):
        assert "innerHTML" not in script.read_text(), script  # API data is only ever text in the page


def test_the_demo_prints_the_pages_address_last_and_the_server_logs_it(server):
    printed = example_commands(server.base_url, "a-key", Path("cat.png")).strip().splitlines()[-1]
    assert printed.split()[-1] == f"{server.base_url}/ui"
    assert httpx.get(printed.split()[-1]).headers["content-type"].startswith("text/html")
    server.wait_for_log(f"web page: {server.base_url}/ui")


def test_the_tabs_work_from_the_keyboard(page, server, filled):
    open_page(page, server)
    page.get_by_role("tab", name="Search").focus()
    page.keyboard.press("ArrowRight")
    expect(page.get_by_role("tab", name="Tag an image")).to_be_focused()
    expect(page.get_by_role("tab", name="Tag an image")).to_have_attribute("aria-selected", "true")
    expect(page.get_by_role("tabpanel", name="Tag an image")).to_be_visible()
    page.keyboard.press("End")
    expect(page.get_by_role("tabpanel", name="Models & collections")).to_be_visible()
    assert "tab=models" in page.url
    page.keyboard.press("ArrowRight")  # wraps around
    expect(page.get_by_role("tabpanel", name="Search")).to_be_visible()


# -- search ---------------------------------------------------------------------------------------------------
def test_a_text_query_shows_thumbnails_and_the_address_repeats_it(page, server, filled):
    open_page(page, server)
    text_search(page, "red circle", k=6)
    expected = api_search(server, text="red circle", k=6, truncate=True)
    expect(page.locator("#search-results img")).to_have_count(6)
    assert grid_ids(page, "#search-results") == expected
    assert "text=red+circle" in page.url and "reader-key" not in page.url
    page.reload()  # the link alone repeats the search
    expect(page.locator("#search-results img")).to_have_count(6)
    assert grid_ids(page, "#search-results") == expected


def test_more_like_this_then_download_the_results(page, server, filled):
    open_page(page, server)
    text_search(page, "a square", k=6)
    expect(page.locator("#search-results img")).to_have_count(6)
    picked = grid_ids(page, "#search-results")[3]
    page.get_by_role("button", name=f"More like {picked}").click()
    expect(page.locator("#search-results > li").first).to_have_attribute("data-id", picked)
    expect(page.locator("#search-results .score").first).to_have_text("1.000")
    assert grid_ids(page, "#search-results") == api_search(server, id=picked, k=6)
    assert f"id={picked}" in page.url
    with page.expect_download() as download:
        page.get_by_role("button", name="Download JSON").click()
    saved = json.loads(Path(download.value.path()).read_text())
    assert saved["query"] == {"id": picked}
    assert [r["id"] for r in saved["results"]] == grid_ids(page, "#search-results")


def test_metadata_filter_chips_narrow_the_results(page, server, filled):
    open_page(page, server)
    page.get_by_label("Metadata filter (key = value)").fill("colour = blue")
    page.get_by_role("button", name="Add filter").click()
    expect(page.get_by_role("button", name="Remove filter colour = blue")).to_be_visible()
    text_search(page, "a circle", k=8)
    expect(page.locator("#search-results img")).to_have_count(8)
    ids = grid_ids(page, "#search-results")
    assert ids == api_search(server, text="a circle", k=8, truncate=True, filter={"colour": "blue"})
    assert all(i.startswith("blue-") for i in ids) and "filter=colour" in page.url
    page.get_by_role("button", name="Remove filter colour = blue").click()
    expect(page.locator("#filter-chips li")).to_have_count(0)


def test_an_uploaded_image_finds_itself_first(page, server, filled):
    open_page(page, server)
    page.get_by_label("Collection", exact=True).select_option("shapes")
    page.get_by_label("Or search by an image").set_input_files(filled[9])
    expect(page.locator("#search-results > li").first).to_have_attribute("data-id", filled[9].stem)
    expect(page.locator("#search-results .score").first).to_have_text("1.000")


# -- tagging --------------------------------------------------------------------------------------------------
def tags_shown(page: Page) -> list[tuple[str, float]]:
    """(label, probability) as the table shows them, best first."""
    rows = page.locator("#tag-results tbody tr")
    expect(rows.first).to_be_visible()
    return [(row.locator("th").inner_text(), float(row.locator("td .value").first.inner_text()))
            for row in rows.all()]


def api_tags(server: Server, path: Path, **options) -> list[tuple[str, float]]:
    with server.client("reader-key") as client:
        response = client.post("/v1/classify", json={"images": [image_b64(path)], **options})
    response.raise_for_status()
    return [(t["label"], t["probability"]) for t in response.json()["results"][0]["labels"]]


def assert_same_tags(shown, expected) -> None:
    """Same labels in the same order, probabilities as the page rounds them (3 decimals)."""
    assert [label for label, _ in shown] == [label for label, _ in expected]
    assert [p for _, p in shown] == pytest.approx([p for _, p in expected], abs=6e-4)


@pytest.mark.parametrize("label_set, count", [("colour", 4), ("api-shapes", 3)])  # the bundle's; one PUT via the API
def test_a_dropped_image_is_tagged_with_a_label_set(page, server, filled, label_set, count):
    with server.client("writer-key") as writer:
        writer.put("/v1/label-sets/api-shapes", json={"labels": ["circle", "square", "triangle"],
                                                      "templates": ["a {} shape"]}).raise_for_status()
    open_page(page, server)
    tab(page, "Tag an image")
    drop_file(page, "#tag-drop", filled[0])
    expect(page.get_by_role("img", name="the image to tag")).to_be_visible()
    page.get_by_label("Labels from").select_option(label_set)
    page.get_by_role("button", name="Tag", exact=True).click()
    shown = tags_shown(page)
    assert_same_tags(shown, api_tags(server, filled[0], label_set=label_set, top_k=5))
    assert len(shown) == count and sum(p for _, p in shown) == pytest.approx(1.0, abs=3e-3)


def test_typed_labels_with_templates_in_multi_label_mode(page, server, filled):
    open_page(page, server)
    tab(page, "Tag an image")
    page.get_by_label("Image: drop it here, or choose one", exact=True).set_input_files(filled[4])
    page.get_by_label("Labels, comma-separated").fill("red, blue, green, orange, circle, square")
    page.get_by_label("Prompt templates").fill("a {} shape\na {} icon")
    page.get_by_label("Top k").fill("10")
    page.get_by_label("Multi-label").check()
    page.get_by_label("Threshold", exact=True).fill("0.15")
    page.get_by_role("button", name="Tag", exact=True).click()
    expected = api_tags(server, filled[4], labels=["red", "blue", "green", "orange", "circle", "square"],
                        templates=["a {} shape", "a {} icon"], top_k=10, multi_label=True, threshold=0.15)
    if expected:
        assert_same_tags(tags_shown(page), expected)
    else:
        expect(page.locator("#tag-results tbody")).to_have_text("no label reaches the threshold")


# -- clusters -------------------------------------------------------------------------------------------------
def test_a_texts_clusters_and_a_clusters_items_browsed_in_turn(page, server, filled):
    open_page(page, server)
    tab(page, "Clusters")
    page.get_by_label("Text", exact=True).fill("red circle")
    page.get_by_role("button", name="Clusters of this text").click()
    with server.client("reader-key") as client:
        answer = client.post("/v1/clusters", json={"texts": ["red circle"], "top_k": 5}).json()
        top = answer["results"][0]
        rows = page.locator("#clusters-results tbody tr")
        expect(rows).to_have_count(5)
        assert rows.locator("th").all_inner_texts() == [str(c["cluster"]) for c in top["clusters"]]
        first = top["clusters"][0]["cluster"]
        page.get_by_role("button", name=f"Items of cluster {first}").click()
        check_cluster_shown(page, client, first)
        page.get_by_role("button", name="Next cluster").click()
        check_cluster_shown(page, client, min(first + 1, answer["num_clusters"] - 1))


def check_cluster_shown(page: Page, client: httpx.Client, cluster: int) -> None:
    """The grid shows the cluster's most probable items as the API lists them."""
    expect(page.get_by_label("Cluster", exact=True)).to_have_value(str(cluster))
    expect(page.locator("#cluster-status")).to_contain_text(f"Cluster {cluster} ")  # set as the grid is replaced
    described = client.get(f"/v1/clusters/{cluster}", params={"collection": "shapes", "top": 12}).json()
    assert grid_ids(page, "#cluster-items") == [item["id"] for item in described["items"]]


def test_a_clip_bundle_says_why_the_clusters_tab_is_empty(page, swap_server, bundles):
    with swap_server.client("admin-key") as admin:
        clip_id = next(m["id"] for m in admin.get("/v1/models").json()["data"] if m["objective"] == "clip")
        admin.post(f"/v1/models/{clip_id}/activate").raise_for_status()
    open_page(page, swap_server)
    tab(page, "Clusters")
    expect(page.locator("#clusters-unavailable")).to_contain_text(f"{clip_id}, was trained with the CLIP objective")
    expect(page.get_by_label("Text", exact=True)).to_be_disabled()


# -- models, keys and limits --------------------------------------------------------------------------------------
def test_an_admin_activates_another_model_and_sees_it_active(page, swap_server, bundles):
    with swap_server.client("admin-key") as admin:
        models = admin.get("/v1/models").json()
    target = next(m["id"] for m in models["data"] if m["path"] == str(bundles["xclip-b"]))
    if models["active"] == target:  # another test left it active: start from the first model
        with swap_server.client("admin-key") as admin:
            admin.post("/v1/models/rollback").raise_for_status()
    open_page(page, swap_server, key="admin-key")
    tab(page, "Models & collections")
    row = page.locator(f'#models-table tr[data-model="{target}"]')
    expect(row.locator(".state")).to_have_text("registered")
    page.get_by_role("button", name=f"Activate {target}").click()
    expect(row.locator(".state")).to_have_text("active")
    # the collection re-embeds in the background; the tab follows it live, with no reload
    expect(page.locator('#collections-table tr[data-collection="few"] .model')).to_have_text(target)
    with swap_server.client("reader-key") as client:
        assert client.get("/v1/models").json()["active"] == target


def test_a_wrong_key_and_a_missing_scope_show_the_apis_message(page, server, filled):
    open_page(page, server, key="not-a-key")
    alert = page.locator("#search-error")
    expect(alert).to_contain_text("401")
    expect(alert).to_contain_text("Type a valid API key")
    page.get_by_label("API key").fill("reader-key")
    page.get_by_role("button", name="Save key").click()
    expect(alert).to_be_hidden()
    tab(page, "Models & collections")
    page.get_by_role("button", name="Roll back to the previous model").click()
    expect(page.locator("#models-error")).to_contain_text("403: this API key lacks the 'admin' scope")


def test_an_upload_over_the_apis_limit_is_refused_before_sending(page, swap_server, tmp_path):
    big = tmp_path / "noise.png"
    big.write_bytes(noise_png(64))
    assert big.stat().st_size > MAX_IMAGE_BYTES
    sent = []
    page.on("request", lambda request: request.url.endswith("/v1/classify") and sent.append(request))
    open_page(page, swap_server)
    tab(page, "Tag an image")
    page.get_by_label("Image: drop it here, or choose one", exact=True).set_input_files(big)
    page.get_by_label("Labels, comma-separated").fill("noise, silence")
    page.get_by_role("button", name="Tag", exact=True).click()
    limit = f"{MAX_IMAGE_BYTES / 1024:.1f} KiB"
    expect(page.locator("#tag-error")).to_contain_text(f"the service takes images up to {limit}")
    assert not sent
