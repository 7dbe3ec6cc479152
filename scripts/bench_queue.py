"""The scoring queue under load: exams per hour with 1 and 2 ``ich worker`` processes (one core, one thread each),
and last instance -> worklist per exam. Prints numbers; not a test.

    .venv/bin/python scripts/bench_queue.py [--exams 12] [--workers 1,2] [--weights CKPT.json]

A throw-away PostgreSQL server (tests/postgres.py), a queue-mode listener in this process, workers pinned to a core
each (``taskset``: the engine then runs one thread). Exams are synthetic 512x512 phantoms (28-40 slices), all sent
at once, one association each; the clock starts at the first send. Workers start (and load the model) before it.
Latency counts from the end of the exam's association and includes the listener's quiet period (1 s here).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pydicom  # noqa: E402
import sqlalchemy as sa  # noqa: E402

from ich import phantom  # noqa: E402
from ich.jobs import Queue  # noqa: E402
from ich.listener import Inbox, Listener  # noqa: E402
from ich.worklist import Worklist  # noqa: E402
from tests import postgres  # noqa: E402
from tests.test_listener import send  # noqa: E402


def run(server: postgres.Server, exams: list[list], workers: int, weights: str | None) -> dict[str, float]:
    name = server.create_database()
    with tempfile.TemporaryDirectory(prefix="ich-bench-queue-") as tmp:
        worklist = Worklist(tmp, database_url=server.url(name))
        queue = Queue(worklist)
        listener = Listener(worklist, None, Inbox(Path(tmp) / "inbox", 1.0), enqueue=queue.defer)
        listener.ae.maximum_associations = max(10, len(exams))
        port = listener.start("127.0.0.1", 0, poll_seconds=0.1)
        env = {**os.environ, "ICH_DATABASE_URL": server.url(name)}
        command = [sys.executable, "-m", "ich", "worker", "--data-dir", tmp, "--device", "cpu"]
        command += ["--weights", weights] if weights else []
        cores = os.sched_getaffinity(0)
        procs = [
            subprocess.Popen(["taskset", "-c", str(sorted(cores)[k % len(cores)]), *command], cwd=ROOT, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for k in range(workers)
        ]  # fmt: skip
        try:
            with worklist.engine.connect() as db:  # every worker registered: torch imported, model loaded
                while db.execute(sa.text("SELECT COUNT(*) FROM procrastinate_workers")).scalar_one() < workers:
                    time.sleep(0.2)
                    db.rollback()
            start, sent = time.time(), {}

            def push(exam: list) -> None:
                assert send(port, exam) == [0] * len(exam)
                sent[exam[0].StudyInstanceUID] = time.time()

            with ThreadPoolExecutor(len(exams)) as pool:
                list(pool.map(push, exams))
            while len(worklist) < len(exams):
                time.sleep(0.2)
            end = time.time()
            with worklist.engine.connect() as db:
                landed: dict[str, str] = dict(db.execute(sa.text("SELECT study_uid, received FROM studies")).all())
        finally:
            for p in procs:
                p.terminate()
                p.wait(30)
            listener.stop()
            queue.close()
    server.drop_database(name)
    # `received` is written as the row commits, to the second: last instance -> worklist per exam
    latency = [dt.datetime.fromisoformat(landed[uid]).timestamp() - t for uid, t in sent.items()]
    return {
        "exams_per_hour": len(exams) / (end - start) * 3600,
        "wall_s": end - start,
        "latency_median_s": statistics.median(latency),
        "latency_max_s": max(latency),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--exams", type=int, default=12)
    parser.add_argument("--workers", default="1,2", help="worker counts to measure, comma-separated")
    parser.add_argument("--weights", help="checkpoint (default: the bundled weights)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ich-bench-exams-") as tmp:
        exams = [
            [pydicom.dcmread(p) for p in phantom.write_study(phantom.generate_study(seed), Path(tmp) / str(seed))]
            for seed in range(args.exams)
        ]
    server = postgres.start()
    try:
        for n in (int(w) for w in args.workers.split(",")):
            result = run(server, exams, n, args.weights)
            print(
                f"{n} worker(s): {result['exams_per_hour']:.0f} exams/hour ({args.exams} exams in "
                f"{result['wall_s']:.1f} s), last instance -> worklist median {result['latency_median_s']:.1f} s, "
                f"max {result['latency_max_s']:.1f} s"
            )
    finally:
        server.stop()


if __name__ == "__main__":
    main()
