"""Take ``docs/viewer-1440x900.png`` and ``docs/viewer-1920x1080.png``: the reading screen on a real scan.

The 238-slice thin CQ500 series ``CQ500-CT-0`` is scored by the bundled model into a temporary data
directory, the dashboard is started on it, and Chromium opens the viewer at both reading-screen sizes.

    .venv/bin/python docs/make_viewer_screenshots.py [--out docs]

Needs ``../shared/data`` and Chromium at /usr/bin/chromium (as ``tests/test_browser.py`` does).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ich import dicom  # noqa: E402
from ich.inference import Predictor, default_weights  # noqa: E402
from ich.worklist import Worklist, ingest  # noqa: E402
from tests.helpers import streamlit_server  # noqa: E402

SERIES = ROOT.parent / "shared" / "data" / "cq500" / "CQ500-CT-0"
SIZES = ((1440, 900), (1920, 1080))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    dicom.quiet_invalid_values()
    with tempfile.TemporaryDirectory(prefix="ich-shots-") as tmp:
        data = Path(tmp) / "data"
        files = [dicom.Upload(f.name, f.read_bytes()) for f in sorted(SERIES.glob("*.dcm"))]
        report = ingest(Worklist(data), Predictor.from_checkpoint(default_weights()), files)
        assert report.added, report.problems
        with streamlit_server(data, None, Path(tmp) / "streamlit.log", ICH_DEMO="0") as url, sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
            for width, height in SIZES:
                page = browser.new_page(viewport={"width": width, "height": height})
                page.goto(f"{url}/viewer?study={report.added[0]}")
                frame = page.frame_locator("iframe[title$='slice_viewer']")
                # Opened as the slabs the model scored; "loading" while the first image is the server's preview.
                frame.locator("#hud-slice").filter(has_text="/ 30").wait_for(timeout=180_000)
                frame.locator("#preview").wait_for(state="hidden", timeout=180_000)
                page.get_by_test_id("stStatusWidget").wait_for(state="hidden", timeout=180_000)
                page.wait_for_timeout(1500)
                out = args.out / f"viewer-{width}x{height}.png"
                page.screenshot(path=out)
                print(f"wrote {out}")
                page.close()
            browser.close()


if __name__ == "__main__":
    main()
