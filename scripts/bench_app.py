"""Dashboard latency: upload-to-worklist for a 36-slice series, and the viewer's server side.

Upload-to-worklist = read the uploaded bytes -> HU -> preprocess -> inference -> store (volume npz +
SQLite), with the model already loaded (targets <= 2 s on CPU). Scrolling runs in the browser (NiiVue);
what remains on the server: the study's viewer file (once per study), and when the reader settles on a
slice, the probability curve (target <= 100 ms) and the whole viewer script rerun (AppTest, no browser
paint). Prints numbers; not a test.

    .venv/bin/python scripts/bench_app.py [--weights CKPT.json] [--repeat 5]

The series is the first 36-slice series of ../shared/data/rsna-sample, else a 36-slice phantom.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
logging.getLogger("streamlit").setLevel(logging.ERROR)  # importing the app outside `streamlit run` warns

from ich import dicom, phantom, viewer  # noqa: E402
from ich.inference import Predictor, default_weights  # noqa: E402
from ich.worklist import Worklist, ingest  # noqa: E402

N_SLICES = 36


def series_files(tmp: Path) -> list[Path]:
    rsna = ROOT.parent / "shared" / "data" / "rsna-sample" / "stage_2_train"
    if rsna.is_dir():
        for s in dicom.load(rsna, pixels=False).series:
            if len(s) == N_SLICES and not s.duplicates:
                return [Path(x.path) for x in s.slices]
    phantom.write_study(phantom.generate_study(0, n_slices=N_SLICES), tmp / "phantom")
    return sorted((tmp / "phantom").rglob("*.dcm"))


def median_ms(fn, repeat: int) -> tuple[float, float]:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000, max(times) * 1000


def main() -> None:
    dicom.quiet_invalid_values()  # an entry point: RSNA's invalid UIDs are expected
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default=None, help="checkpoint (default: $ICH_WEIGHTS or weights/)")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    weights = Path(args.weights) if args.weights else default_weights()

    with tempfile.TemporaryDirectory(prefix="ich-bench-") as tmp_name:
        tmp = Path(tmp_name)
        start = time.perf_counter()
        pred = Predictor.from_checkpoint(weights)
        print(f"model {pred.name} on {pred.device}: loaded in {time.perf_counter() - start:.2f} s (not counted below)")
        uploads = [dicom.Upload(p.name, p.read_bytes()) for p in series_files(tmp)]  # bytes as a browser sends them
        print(f"series: {len(uploads)} files, {sum(len(u.data) for u in uploads) / 1e6:.1f} MB")
        wl = Worklist(tmp / "data")
        ingest(wl, pred, uploads[:4])  # warm-up: first-call allocations and thread pools

        def upload() -> None:
            report = ingest(wl, pred, uploads)
            assert len(report.added) == 1 and not report.problems, report.problems

        med, worst = median_ms(upload, args.repeat)
        print(
            f"upload-to-worklist ({len(uploads)} slices): median {med / 1000:.2f} s, worst {worst / 1000:.2f} s  (target <= 2 s)"
        )
        for name, ms in stage_medians(wl, pred, uploads, args.repeat).items():
            print(f"  {name:11s} {ms:6.0f} ms")

        from ich.presentation import probability_figure

        study_id = int(wl.studies().iloc[0]["id"])
        slices, vol, thresholds = wl.slices(study_id), wl.volume(study_id), wl.study(study_id).thresholds
        indices = iter(range(10**9))

        def settle() -> None:
            probability_figure(slices, next(indices) % len(vol), thresholds).to_json()  # what st.plotly_chart sends

        settle()
        med, worst = median_ms(settle, 20)
        print(f"settled slice: build the curve: median {med:.0f} ms, worst {worst:.0f} ms  (target <= 100 ms)")
        start = time.perf_counter()
        viewer.volume_nifti(vol, wl.affine(study_id))
        print(f"study -> browser viewer file (.nii.gz, once per study): {(time.perf_counter() - start) * 1000:.0f} ms")
        print(
            f"settled slice: whole viewer script rerun (AppTest): median {viewer_rerun_ms(tmp / 'data', weights, study_id, len(vol)):.0f} ms"
        )
        print("scrolling itself runs in the browser: its per-step times come from tests/test_browser.py")


def stage_medians(wl: Worklist, pred: Predictor, uploads: list[dicom.Upload], repeat: int) -> dict[str, float]:
    """Median milliseconds of each stage of an upload, run one after another as ingest does."""
    stages: dict[str, list[float]] = {"read": [], "preprocess": [], "inference": [], "store": []}
    for _ in range(repeat):
        start = time.perf_counter()
        series = next(dicom.iter_series(uploads, []))
        stages["read"].append(time.perf_counter() - start)
        prediction = pred.predict_series(series)
        stages["preprocess"].append(prediction.timings["preprocess_s"])
        stages["inference"].append(prediction.timings["infer_s"])
        start = time.perf_counter()
        wl.add_study(series, prediction, thresholds=pred.thresholds)
        stages["store"].append(time.perf_counter() - start)
    return {name: statistics.median(times) * 1000 for name, times in stages.items()}


def viewer_rerun_ms(data: Path, weights: Path, study_id: int, n: int) -> float:
    """The reader settles on a slice in the browser viewer: the whole viewer page script, minus the browser."""
    from streamlit.testing.v1 import AppTest

    os.environ.update(ICH_DATA_DIR=str(data), ICH_WEIGHTS=str(weights))
    Worklist(data).set_meta("demo_seeded", "bench")  # no demo studies in the bench store
    at = AppTest.from_file(str(ROOT / "streamlit_app.py"), default_timeout=120)
    at.run()
    next(b for b in at.button if b.label.startswith("Open ")).click().run()  # the worklist's top study
    times = []
    for k in range(1, min(n, 12) + 1):
        at.session_state[f"viewer-{study_id}"] = {"slice": k, "seq": k}  # what the browser viewer reports
        start = time.perf_counter()
        at.run()
        times.append(time.perf_counter() - start)
    assert not at.exception, at.exception
    return statistics.median(times) * 1000


if __name__ == "__main__":
    main()
