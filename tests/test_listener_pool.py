"""ich.listener's pool of scoring workers: exams scored side by side, the oldest arrival first, none twice at once.

Asserts on the scoring intervals the fake predictor records, never on wall time (the machine is shared).
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict

import pytest

from ich.engine import cpu_threads
from ich.exam import MIN_SLICES
from ich.listener import MAX_SCORING_WORKERS, Inbox, Listener, scoring_workers
from ich.worklist import Worklist
from tests.helpers import FakePredictor
from tests.test_listener import send, series, wait_for

QUIET = 0.2
SCORING_SECONDS = 1.0  # what the fake takes per exam: long beside the quiet period and the sends


class SlowPredictor(FakePredictor):
    """Takes ``seconds`` per exam (``slow`` ones three times that) and records each scoring's interval by study."""

    threads = 1

    def __init__(self, seconds: float = SCORING_SECONDS, slow: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.seconds, self.slow = seconds, slow
        self.started: list[str] = []  # study UIDs in the order their scoring began
        self.intervals: defaultdict[str, list[tuple[float, float]]] = defaultdict(list)
        self._lock = threading.Lock()

    def predict_series(self, series, progress=None):
        start = time.monotonic()
        with self._lock:
            self.started.append(series.study_uid)
        time.sleep(self.seconds * (3 if series.study_uid in self.slow else 1))
        with self._lock:
            self.intervals[series.study_uid].append((start, time.monotonic()))
            return super().predict_series(series, progress)


@pytest.fixture
def pool(tmp_path, request):
    """A running listener with ``request.param`` workers and its slow predictor."""
    predictor = SlowPredictor()
    wl = Worklist(tmp_path)
    listener = Listener(wl, predictor, Inbox(tmp_path / "inbox", QUIET), workers=request.param)
    port = listener.start("127.0.0.1", 0, poll_seconds=0.05)
    yield wl, predictor, port
    listener.stop()


def overlap(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return a[0] < b[1] and b[0] < a[1]


def test_pool_size_follows_the_cores_and_the_threads_of_one_inference(tmp_path):
    assert scoring_workers(threads_per_exam=2, cores=2) == 1  # ONNX Runtime on every core of a 2-core CPU
    assert scoring_workers(threads_per_exam=1, cores=2) == 2
    assert scoring_workers(threads_per_exam=4, cores=16) == 4
    assert scoring_workers(threads_per_exam=1, cores=64) == MAX_SCORING_WORKERS  # each holds an exam in memory
    assert scoring_workers(threads_per_exam=8, cores=4) == 1
    # A scorer that does not say how many threads it uses is taken to use them all: one exam at a time.
    assert Listener(Worklist(tmp_path), FakePredictor(), Inbox(tmp_path / "inbox")).workers == 1
    one_thread = scoring_workers(threads_per_exam=1, cores=cpu_threads())
    assert Listener(Worklist(tmp_path), SlowPredictor(), Inbox(tmp_path / "inbox")).workers == one_thread


@pytest.mark.parametrize("pool", [2], indirect=True)
def test_two_exams_are_scored_side_by_side(pool):
    wl, predictor, port = pool
    first, second = series(MIN_SLICES), series(MIN_SLICES)
    assert send(port, first + second) == [0] * 2 * MIN_SLICES  # one association: both exams due at the same moment
    wait_for(lambda: len(wl) == 2)
    (a,), (b,) = (predictor.intervals[s[0].StudyInstanceUID] for s in (first, second))
    assert overlap(a, b), "the second exam waited for the first"


@pytest.mark.parametrize("pool", [2], indirect=True)
def test_an_exam_growing_while_scored_is_scored_again_after_not_beside(pool):
    wl, predictor, port = pool
    exam = series(MIN_SLICES)
    study = exam[0].StudyInstanceUID
    send(port, exam)
    wait_for(lambda: study in predictor.started)
    send(port, series(1, study, exam[0].SeriesInstanceUID, start=MIN_SLICES))  # due again while a worker holds it
    wait_for(lambda: len(wl) == 1 and wl.study(int(wl.studies()["id"].iloc[0])).n_slices == MIN_SLICES + 1)
    first, second = predictor.intervals[study]
    assert not overlap(first, second)


@pytest.mark.parametrize("pool", [1], indirect=True)
def test_of_the_exams_waiting_the_oldest_arrival_goes_first(pool):
    """X arrives before Y but its last instance comes after Y's, so Y is quiet (due) first: X is still scored first."""
    wl, predictor, port = pool
    long = series(MIN_SLICES)
    predictor.slow = (long[0].StudyInstanceUID,)
    send(port, long)
    wait_for(lambda: predictor.started)  # the only worker is busy for 3 s: X and Y both wait
    x, y = series(MIN_SLICES), series(MIN_SLICES)
    send(port, x[:1])
    send(port, y)
    send(port, x[1:])
    wait_for(lambda: len(wl) == 3)
    order = [long[0].StudyInstanceUID, x[0].StudyInstanceUID, y[0].StudyInstanceUID]
    assert predictor.started == order
