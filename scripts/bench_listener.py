"""DICOM listener: receive throughput and the time from a series' last instance to its worklist entry.

A 36-slice series is pushed over loopback C-STORE (pynetdicom SCU, one association) to a running
``ich.listener.Listener`` with the model loaded. Prints, per repeat: slices/s received and stored,
and seconds from the last C-STORE response to the worklist entry, minus the quiet period (goal
<= 5 s on this CPU). Prints numbers; not a test.

    .venv/bin/python scripts/bench_listener.py [--weights CKPT.json] [--repeat 3] [--quiet-seconds 1]

The series is the first 36-slice series of ../shared/data/rsna-sample, else a 36-slice phantom.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pydicom import dcmread  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402
from pynetdicom import AE  # noqa: E402
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]  # noqa: E402

from ich import dicom  # noqa: E402
from ich.inference import Predictor  # noqa: E402
from ich.listener import Inbox, Listener  # noqa: E402
from ich.worklist import Worklist  # noqa: E402
from scripts.bench_app import series_files  # noqa: E402


def push(port: int, datasets: list) -> float:
    """Seconds to send every dataset in one association."""
    ae = AE(ae_title="BENCH")
    ae.add_requested_context(CTImageStorage, [str(datasets[0].file_meta.TransferSyntaxUID)])
    start = time.perf_counter()
    assoc = ae.associate("127.0.0.1", port, ae_title="ICH")
    if not assoc.is_established:
        raise SystemExit("the listener refused the association")
    for ds in datasets:
        status = assoc.send_c_store(ds)
        if not status or status.Status != 0:
            raise SystemExit(f"C-STORE failed: {status}")
    assoc.release()
    return time.perf_counter() - start


def main() -> None:
    dicom.quiet_invalid_values()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default=None, help="checkpoint (default: $ICH_WEIGHTS or weights/)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--quiet-seconds", type=float, default=1.0)
    args = parser.parse_args()
    predictor = Predictor.from_checkpoint(args.weights)
    with tempfile.TemporaryDirectory(prefix="ich-bench-") as tmp:
        files = series_files(Path(tmp))
        originals = [dcmread(f) for f in files]
        wl = Worklist(Path(tmp) / "data")
        listener = Listener(wl, predictor, Inbox(Path(tmp) / "data" / "inbox", args.quiet_seconds))
        port = listener.start("127.0.0.1", 0, poll_seconds=0.05)
        rates, latencies = [], []
        try:
            for _ in range(args.repeat):
                study_uid, series_uid = generate_uid(), generate_uid()  # a new exam each time: a new worklist row
                for ds in originals:
                    ds.SOPClassUID = ds.get("SOPClassUID") or CTImageStorage  # RSNA's anonymised files lack it
                    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
                    ds.SOPInstanceUID = generate_uid()
                before = len(wl)
                seconds = push(port, originals)
                sent = time.perf_counter()
                while len(wl) == before:
                    time.sleep(0.01)
                latencies.append(time.perf_counter() - sent - args.quiet_seconds)
                rates.append(len(originals) / seconds)
        finally:
            listener.stop()
    print(
        f"series: {len(originals)} slices; quiet period {args.quiet_seconds:g} s; model {predictor.name} on {predictor.device}"
    )
    print(
        f"received and stored: median {statistics.median(rates):.0f} slices/s (min {min(rates):.0f}, max {max(rates):.0f})"
    )
    print(
        f"last instance -> worklist, after the quiet period: median {statistics.median(latencies):.2f} s "
        f"(max {max(latencies):.2f}; goal <= 5 s)"
    )


if __name__ == "__main__":
    main()
