"""`imagic ui` end to end in a real, headless Chromium (Debian's `chromium`, driven by
Playwright), on the CPU with the embedded model and a few training steps.

Skipped, with the reason, when Playwright or Chromium is missing (`.ci/run` installs Chromium).
With IMAGIC_UI_SCREENSHOTS=DIR it edits with the preset's full recipe instead and saves the
README's screenshots, ui-before.png and ui-after.png, in DIR:

    IMAGIC_UI_SCREENSHOTS=docs/images .venv/bin/python -m pytest tests/test_ui_browser.py
"""

import os
import shutil
import socket
import zipfile
from pathlib import Path

import pytest

pytest.importorskip("gradio", reason="imagic ui needs gradio (pip install gradio)")
sync_api = pytest.importorskip(
    "playwright.sync_api", reason="the browser test needs Playwright (pip install playwright)")
CHROMIUM = os.environ.get("IMAGIC_CHROMIUM") or shutil.which("chromium") or shutil.which(
    "chromium-browser")
if not CHROMIUM:
    pytest.skip("the browser test needs Chromium: apt-get install chromium (or set "
                "IMAGIC_CHROMIUM to its binary)", allow_module_level=True)

import imagic.editor  # noqa: E402
from imagic import EditSession, load_backend  # noqa: E402
from imagic.ui import Studio  # noqa: E402
from imagic.ui.page import serve  # noqa: E402

# anyio imports its file module on first use; imported then from the server's threads, pytest's
# assertion rewriting of it can race (CPython 3.11: "AST constructor recursion depth
# mismatch") and the page's first file fails. Import it here, once, in the main thread.
anyio = pytest.importorskip("anyio")
anyio.open_file  # noqa: B018

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "large-red-circle-top-left.png"
SCREENSHOTS = os.environ.get("IMAGIC_UI_SCREENSHOTS")
# a few steps for the test; the preset's own recipe for the screenshots
FEW = {"embed-steps": "4", "finetune-steps": "4", "sample-steps": "10", "etas": "0.9,1.1"}
WAIT_MS = (600 if SCREENSHOTS else 120) * 1000


@pytest.fixture
def server(tmp_path, monkeypatch):
    """The page on a free local port, in this process (so the test can count the engine's
    training loops), and the calls of those loops."""
    training = []
    train = imagic.editor.train

    def counted(*args, **kwargs):
        training.append(kwargs.get("label"))
        return train(*args, **kwargs)

    monkeypatch.setattr(imagic.editor, "train", counted)
    studio = Studio(load_backend(None), tmp_path / "sessions")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    page = serve(studio, "127.0.0.1", port, block=False)
    yield f"http://127.0.0.1:{port}/", studio, training
    page.close()


@pytest.fixture
def browser():
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield chromium.new_page(viewport={"width": 1280, "height": 1000})
        chromium.close()


def status(page) -> str:
    return page.inner_text("#status")


def wait_for_status(page, text: str) -> str:
    page.wait_for_function(
        "text => document.querySelector('#status').innerText.includes(text)", arg=text,
        timeout=WAIT_MS)
    return status(page)


def captions(page) -> list[str]:
    return page.locator("#gallery .caption-label").all_inner_texts()


def test_edit_rerender_and_download_in_a_browser(server, browser, tmp_path):
    url, studio, training = server
    page = browser
    page.goto(url)
    page.wait_for_selector("#edit")
    if SCREENSHOTS:  # once the sessions list has loaded
        page.wait_for_function("document.querySelector('#sessions [data-testid=status-tracker]')"
                               ".classList.contains('hide')")
        page.screenshot(path=str(Path(SCREENSHOTS) / "ui-before.png"), full_page=True)

    # upload a shipped example, type the target, a few steps behind "advanced", press Edit
    page.set_input_files("#upload input[type=file]", str(EXAMPLE))
    assert wait_for_status(page, "ready") == f"ready: {EXAMPLE.name}"
    page.fill("#text textarea", "a large blue circle at the top left")
    if not SCREENSHOTS:
        page.click("#advanced .label-wrap")
        for field, value in FEW.items():
            page.fill(f"#{field} input, #{field} textarea", value)
    page.click("#edit")
    done = wait_for_status(page, "edited")
    assert "image(s)" in done
    page.wait_for_selector("#gallery .caption-label")
    if not SCREENSHOTS:
        assert captions(page) == ["η 0.9 · seed 0", "η 1.1 · seed 0"]
    assert training == ["stage 1/3 embedding", "stage 2/3 fine-tune"]

    # move the η slider: a new image appears, rendered from the session without training
    shown = len(captions(page))
    slider = page.locator("#eta input[type=range]")
    box = slider.bounding_box()
    slider.click(position={"x": box["width"] * 0.5, "y": box["height"] / 2})  # η 0.75
    name = done.split()[1].rstrip(":")  # "edited NAME: 2 image(s)"
    wait_for_status(page, f"rendered {name}: {shown + 1} image(s)")
    assert "η 0.75 · seed 0" in captions(page)
    assert training == ["stage 1/3 embedding", "stage 2/3 fine-tune"]  # no training step
    if SCREENSHOTS:
        page.screenshot(path=str(Path(SCREENSHOTS) / "ui-after.png"), full_page=True)

    # download the session: a zip of a session that loads
    with page.expect_download() as download:
        page.click("#download-session")
    archive = tmp_path / "session.zip"
    download.value.save_as(archive)
    with zipfile.ZipFile(archive) as z:
        z.extractall(tmp_path / "unzipped")
    session = EditSession.load(tmp_path / "unzipped" / "session")
    assert session.text == "a large blue circle at the top left"

    # a bad upload gets the command line's one line, and nothing is written
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    page.click("#upload button[aria-label='Clear']")
    page.set_input_files("#upload input[type=file]", str(notes))
    line = wait_for_status(page, "error")
    assert line == "error: notes.txt is not an image Pillow can read"
    assert len([p for p in studio.sessions_dir.iterdir() if not p.name.startswith(".")]) == 1
