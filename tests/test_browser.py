"""The dashboard in a real Chromium (Playwright): upload a phantom .zip and a real RSNA series, triage, view.

Needs the ``playwright`` Python package and a system Chromium at /usr/bin/chromium (Debian package
``chromium``; Playwright's own browser download is not used). Screenshots go to ``artifacts/browser/``
(git-ignored) and the test's tmp_path.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest

from tests.helpers import ROOT, free_port

pytestmark = [pytest.mark.browser, pytest.mark.slow]

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-background-networking",
    "--disable-gpu",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ARTIFACTS = ROOT / "artifacts" / "browser"
SLOW_MS = 180_000  # scoring uploads on a shared CPU

if not CHROMIUM.exists():
    pytest.skip(f"{CHROMIUM} not found: install the Debian package 'chromium'", allow_module_level=True)


@pytest.fixture
def server(tmp_path, tiny_checkpoint):
    """``streamlit run`` on a free localhost port, with a demo worklist already in its data directory."""
    from ich.inference import Predictor
    from ich.worklist import Worklist, seed_demo

    data = tmp_path / "data"
    seed_demo(
        Worklist(data), Predictor.from_checkpoint(tiny_checkpoint, device="cpu"), size=96
    )  # fast stand-in for first start
    port = free_port()
    env = dict(os.environ, ICH_DATA_DIR=str(data), ICH_WEIGHTS=str(tiny_checkpoint))
    log = (tmp_path / "streamlit.log").open("w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "streamlit",
            "run",
            "streamlit_app.py",
            "--server.port",
            str(port),
            "--server.address",
            "127.0.0.1",
        ],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).status == 200:
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"streamlit did not start:\n{(tmp_path / 'streamlit.log').read_text()}")
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture
def uploads(tmp_path, shared_data):
    """A phantom study as a .zip, plus the files of one real RSNA series with hemorrhage and the RSNA label CSV."""
    from ich import dicom, phantom
    from ich.labels import read_rsna_csv

    folder = tmp_path / "phantom"
    phantom.write_study(
        phantom.generate_study(7, n_slices=20, subtypes=["subdural"], size=256), folder
    )  # RSNA series have 28-44
    archive = tmp_path / "phantom-study.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for f in sorted(folder.rglob("*.dcm")):
            zf.write(f, f.relative_to(folder))
    rsna = shared_data / "rsna-sample"
    labels = read_rsna_csv(rsna / "stage_2_train.csv")
    series = next(
        s
        for s in dicom.load(rsna / "stage_2_train", pixels=False).series
        if labels.reindex(s.sop_uids)["any"].sum() > 0
    )
    return [str(archive), *(s.path for s in series.slices)], str(rsna / "stage_2_train.csv"), len(series)


def test_upload_triage_view(server, uploads, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    files, labels_csv, n_rsna = uploads
    ARTIFACTS.mkdir(parents=True, exist_ok=True)

    def shot(page, name: str) -> None:
        # Streamlit keeps the previous run's elements until the rerun replaces them: wait for it to finish.
        expect(page.get_by_test_id("stStatusWidget")).to_be_hidden(timeout=SLOW_MS)
        page.wait_for_timeout(500)  # let images and charts paint
        page.screenshot(path=tmp_path / f"{name}.png", full_page=True)
        shutil.copy(tmp_path / f"{name}.png", ARTIFACTS / f"{name}.png")

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 2400})
            outside: list[str] = []  # a hospital network is offline: the page must ask nothing of the internet

            def local_only(route) -> None:
                url = route.request.url
                if url.startswith((server, "data:", "blob:")):
                    route.continue_()
                else:
                    outside.append(url)
                    route.abort()

            page.route("**/*", local_only)
            page.goto(f"{server}/worklist")  # a page's own address works as a link
            expect(page.get_by_text("Not a medical device")).to_be_visible(timeout=60_000)
            expect(page.get_by_role("heading", name="Worklist")).to_be_visible(timeout=60_000)
            shot(page, "1-worklist-demo")

            page.get_by_role("link", name="Upload").click()
            inputs = page.locator("input[type=file]")
            expect(inputs).to_have_count(2, timeout=30_000)
            inputs.nth(0).set_input_files(files)
            inputs.nth(1).set_input_files(labels_csv)
            go = page.get_by_role("button", name="Score and add to worklist")
            expect(go).to_be_enabled(timeout=60_000)
            go.click()
            expect(page.get_by_text("2 series added to the worklist")).to_be_visible(timeout=SLOW_MS)
            shot(page, "2-upload-done")

            page.get_by_role("link", name="Open the worklist").click()
            # The grid paints on a canvas; its accessible cells are in the DOM but not "visible".
            uploaded = page.locator("[role=gridcell]", has_text=re.compile(r"^Study \d+ · \d+ slices$"))
            expect(uploaded).to_have_count(2, timeout=30_000)
            expect(uploaded.filter(has_text=f"· {n_rsna} slices").first).to_be_attached()
            shot(page, "3-worklist-after-upload")

            page.get_by_role("button", name="in the viewer").click()
            expect(page.get_by_text("Most suspicious slices")).to_be_visible(timeout=60_000)
            expect(page.get_by_text("pred:").first).to_be_visible()
            expect(page.get_by_text("actual:").first).to_be_visible()
            shot(page, "4-viewer")

            # Clicking a point of the probability curve jumps to that slice.
            page.locator(".js-plotly-plot .scatterlayer .trace").first.locator(".points path").nth(1).click(force=True)
            expect(page.get_by_text(re.compile(r"^Slice 2 / \d+"))).to_be_visible(timeout=60_000)

            page.get_by_text("Heatmap (Grad-CAM)").click()
            expect(page.get_by_text("heatmap for any")).to_be_visible(timeout=60_000)
            shot(page, "5-viewer-heatmap")

            page.get_by_role("combobox", name="Study (worklist order)").click()
            page.get_by_role("option", name=re.compile(rf"^Study \d+ · {n_rsna} slices$")).click()
            expect(page.get_by_text("(label CSV)").first).to_be_visible(
                timeout=60_000
            )  # the RSNA labels are the actual
            shot(page, "6-viewer-rsna-series")
            assert not outside, f"requests left the server: {outside}"
        finally:
            browser.close()
