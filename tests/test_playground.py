"""The playground page at `/` in a real headless Chromium (Debian's `chromium`, which .ci/run
installs) against a real `petserve serve --no-ray` on the embedded default: it loads only from the
server, lists the demo adapters, answers a question on an uploaded image and on a dropped video,
captions and classifies (image and audio) as the API does, shows the API's error for a broken
image, and uploads an adapter with the token.

PETSERVE_SCREENSHOT=1 also writes docs/playground.png (the README's screenshot) after the VQA test.
"""
from __future__ import annotations

import base64
import io
import json
import os
import shutil
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest

from petserve.adapters.data import make_demo_examples, make_demo_video_examples, write_video
from tests.test_cli_serve import TOKEN
from tests.test_redteam_server import DefaultServer

ROOT = Path(__file__).resolve().parents[1]
COLORS = ROOT / "adapters/demo_assets/colors.safetensors"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
DEMO = {"colors": ("lora", "vqa"), "shapes": ("vlpet", "vqa"), "count": ("adapter", "vqa"),
        "caption": ("compacter", "caption"), "caps-24": ("cache", "classify"),
        "pitch": ("lora", "audio_classify")}
TIMEOUT_MS = 60_000


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("playground")
    config = tmp / "server.yaml"
    config.write_text(f"max_adapter_bytes: {2 * 2**20}\n")
    server = DefaultServer(tmp / "store", tmp / "server.log", config)
    yield server
    server.kill()


class Browser:
    """One page of a headless Chromium, recording console errors, page errors and every URL
    requested."""

    def __init__(self, playwright) -> None:
        self.browser = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True,
            args=["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"])
        self.page = self.browser.new_page(viewport={"width": 960, "height": 1000})
        self.page.set_default_timeout(TIMEOUT_MS)
        self.errors: list[str] = []
        self.requests: list[str] = []
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        self.page.on("pageerror", lambda e: self.errors.append(f"uncaught: {e}"))
        self.page.on("request", lambda r: self.requests.append(r.url))

    def take_errors(self) -> list[str]:
        errors, self.errors = self.errors, []
        return errors


@pytest.fixture(scope="module")
def browser(server):
    if not os.path.exists(CHROMIUM):
        message = "no chromium: `apt-get install chromium` (.ci/run installs it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    from playwright.sync_api import sync_playwright
    with sync_playwright() as playwright:
        b = Browser(playwright)
        b.page.goto(server.url + "/")
        b.page.wait_for_selector("#adapters tbody tr[data-adapter='colors']")
        yield b
        b.browser.close()


def png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def file_payload(name: str, mime: str, data: bytes) -> dict:
    return {"name": name, "mimeType": mime, "buffer": data}


def ask(b: Browser, adapter: str, question: str | None = None) -> None:
    b.page.check(f"#adapter-{adapter}")
    if question is not None:
        b.page.fill("#question", question)
    b.page.click("#send")       # the submit handler marks the result busy before it returns
    b.page.wait_for_selector("#result[aria-busy='false']")


def assert_local_only(urls: list[str]) -> None:
    """Every request went to this server (blob: is the page's preview of the chosen file)."""
    assert urls
    for url in urls:
        parts = urlsplit(url.removeprefix("blob:"))
        assert parts.scheme in ("http", "data") and parts.hostname in ("127.0.0.1", None), url


def test_page_loads_from_the_server_only(server, browser):
    assert browser.take_errors() == []
    assert_local_only(browser.requests)
    page = httpx.get(server.url + "/")
    assert page.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in page.headers["content-security-policy"]
    for name, ctype in (("playground.js", "text/javascript"), ("playground.css", "text/css")):
        assert httpx.get(f"{server.url}/playground/{name}").headers["content-type"].startswith(ctype)
    for other in ("index.html", "..%2Fplayground.py", "%2E%2E%2Fapi.py"):     # not an asset
        assert httpx.get(f"{server.url}/playground/{other}").status_code == 404
    paths = httpx.get(server.url + "/openapi.json").json()["paths"]
    assert "/" not in paths and not [p for p in paths if p.startswith("/playground")]


def test_lists_the_demo_adapters(browser):
    for adapter, (kind, task) in DEMO.items():
        cells = browser.page.locator(f"#adapters tr[data-adapter='{adapter}'] td").all_inner_texts()
        assert [c.strip() for c in cells[:3]] == [adapter, kind, task], cells
    assert browser.page.locator("#adapters tr[data-adapter='caption'] td").last.inner_text() == "/v1/caption"


def test_picking_by_keyboard_sets_the_request(browser):
    page = browser.page
    page.focus("#adapter-caption")
    page.keyboard.press("Space")
    assert page.inner_text("#route") == "POST /v1/caption with adapter caption"
    assert page.is_hidden("#question-field") and page.is_hidden("#labels-field")
    page.keyboard.press("ArrowDown")                  # the next radio: colors, a VQA adapter
    assert page.inner_text("#route") == "POST /v1/vqa with adapter colors"
    assert page.is_visible("#question-field")
    page.check("#adapter-pitch")
    assert page.get_attribute("#media", "accept") == "audio/*"
    page.check("#adapter-colors")


def test_answers_a_question_on_an_uploaded_image(browser):
    example = make_demo_examples("colors", 1, 7)[0]          # the README's quickstart image
    browser.page.set_input_files("#media", file_payload("one.png", "image/png", png(example.images[0])))
    ask(browser, "colors", "what color is the shape?")
    assert browser.page.inner_text("#result .answer") == example.target
    assert browser.page.inner_text("#result .latency").endswith("ms (measured by the page)")
    assert "total " in browser.page.inner_text("#result .timings")       # the server's timings_ms
    assert browser.take_errors() == []
    if os.environ.get("PETSERVE_SCREENSHOT") == "1":
        browser.page.screenshot(path=str(ROOT / "docs/playground.png"), full_page=True)


def test_answers_a_question_on_a_dropped_video(server, browser, tmp_path):
    clip = write_video(tmp_path / "clip.mp4", make_demo_video_examples("count", 1, 7)[0].frames)
    data = clip.read_bytes()
    expected = httpx.post(f"{server.url}/v1/vqa", timeout=60, data={
        "adapter": "count", "question": "how many shapes are there?"},
        files={"video": ("clip.mp4", data, "video/mp4")}).json()["answer"]
    transfer = browser.page.evaluate_handle(
        """b64 => { const t = new DataTransfer();
                    const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
                    t.items.add(new File([bytes], 'clip.mp4', {type: 'video/mp4'})); return t; }""",
        base64.b64encode(data).decode())
    browser.page.dispatch_event("#drop", "drop", {"dataTransfer": transfer})
    ask(browser, "count", "how many shapes are there?")
    assert browser.page.inner_text("#result .answer") == expected
    assert browser.take_errors() == []


def other_requests() -> list[tuple[str, str, dict, tuple[str, bytes, str]]]:
    """(adapter radio, route, form fields, media part) for each other kind of request the page
    makes: a caption, a cache classification, CLIP zero-shot over labels, an audio clip."""
    from petserve.adapters.data.audio import make_clips, wav_bytes
    image = ("one.png", png(make_demo_examples("caption", 1, 7)[0].images[0]), "image/png")
    labels = ["a red circle", "a blue square", "a green triangle"]
    return [("caption", "/v1/caption", {"adapter": "caption"}, ("image", *image)),
            ("caps-24", "/v1/classify", {"adapter": "caps-24"}, ("image", *image)),
            ("zero-shot", "/v1/classify", {"labels": labels}, ("image", *image)),
            ("pitch", "/v1/audio/classify", {"adapter": "pitch"},
             ("audio", "note.wav", wav_bytes(make_clips("pitch", 1, 7).clips[5]), "audio/wav"))]


def test_captions_and_classifies_as_the_api_does(server, browser):
    for radio, route, fields, (part, name, data, mime) in other_requests():
        form = {k: json.dumps(v) if isinstance(v, list) else v for k, v in fields.items()}
        direct = httpx.post(server.url + route, data=form, files={part: (name, data, mime)}, timeout=60)
        assert direct.status_code == 200, direct.text
        browser.page.check(f"#adapter-{radio}")
        if "labels" in fields:
            browser.page.fill("#labels", "\n".join(fields["labels"]))
        browser.page.set_input_files("#media", file_payload(name, mime, data))
        ask(browser, radio)
        body = direct.json()
        assert browser.page.inner_text("#result .answer") == body.get("caption", body.get("label"))
    assert browser.take_errors() == []


def test_broken_image_shows_the_api_error(server, browser):
    junk = np.random.default_rng(0).integers(0, 256, 600, dtype=np.uint8).tobytes()
    direct = httpx.post(f"{server.url}/v1/vqa", data={"adapter": "colors", "question": "what color?"},
                        files={"image": ("broken.png", junk, "image/png")})
    assert direct.status_code == 415 and direct.json()["error"]["code"] == "unsupported_image_format"
    browser.page.set_input_files("#media", file_payload("broken.png", "image/png", junk))
    ask(browser, "colors", "what color?")
    error = browser.page.locator("#result .error[role='alert']")
    assert error.is_visible()
    assert error.inner_text() == (f"unsupported_image_format: {direct.json()['error']['message']} "
                                  "(HTTP 415)")
    errors = browser.take_errors()     # the browser logs the failed request itself; nothing else
    assert len(errors) == 1 and "status of 415" in errors[0], errors


def test_uploads_an_adapter_with_the_token(browser):
    page = browser.page
    page.fill("#upload-id", "my-colors")
    page.set_input_files("#upload-file", str(COLORS))
    page.fill("#token", "not-the-token")
    page.click("#upload-send")
    page.wait_for_selector("#upload-result .error")
    assert page.inner_text("#upload-result .error").endswith("(HTTP 401)")
    assert page.locator("#adapters tr[data-adapter='my-colors']").count() == 0
    page.fill("#token", TOKEN)
    page.click("#upload-send")
    page.wait_for_selector("#upload-result .ok")
    assert page.inner_text("#upload-result .ok").startswith("Uploaded my-colors version 1 (lora, vqa")
    page.wait_for_selector("#adapters tr[data-adapter='my-colors']")
    assert page.is_checked("#adapter-my-colors")      # picked, ready to ask
    errors = browser.take_errors()
    assert len(errors) == 1 and "status of 401" in errors[0], errors
    assert_local_only(browser.requests)
