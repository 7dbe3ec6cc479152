"""DICOM listener: a Storage SCP (pynetdicom) that puts series pushed by a scanner or PACS on the worklist.

    python -m ich listen --port 11112 --ae-title ICH --allow PACS,CT1

- Accepts CT Image Storage and Enhanced CT Image Storage, and C-ECHO; other SOP classes are
  refused at association (logged), and so are calling AE titles not on ``--allow`` (when given).
- Each instance is written as received (no decoding) under ``<data dir>/inbox/<series key>/``; the
  keys are hashes, so no UID or name appears in a path. A repeated SOP instance is ignored.
- A series is scored when no instance has arrived for ``quiet_seconds``, through the same
  :func:`ich.worklist.ingest` as an upload (a corrupt instance is a problem line, the rest scores).
  A series that grows later is scored again and its worklist entry updated.
- What was scored is recorded beside the files (``scored.json``): after a crash or restart, every
  series whose files differ from that record is scored again, so nothing received is lost.
- Logs: one line per association and per scored series, never a patient identifier.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
from pynetdicom.sop_class import CTImageStorage, EnhancedCTImageStorage, Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from ich import results
from ich.files import atomic_write
from ich.worklist import Worklist, ingest
from ich.worklist.intake import Scorer

__all__ = ["ACCEPTED_SOP_CLASSES", "DEFAULT_AE_TITLE", "DEFAULT_PORT", "Inbox", "Listener", "SendResults"]

log = logging.getLogger(__name__)

ACCEPTED_SOP_CLASSES = (CTImageStorage, EnhancedCTImageStorage)
DEFAULT_PORT = 11112  # the registered DICOM port; 104 needs root
DEFAULT_AE_TITLE = "ICH"
DEFAULT_QUIET_SECONDS = 10.0
SCORED = "scored.json"
# C-STORE statuses (PS3.4 Annex B.2.3)
SUCCESS = 0x0000
CANNOT_UNDERSTAND = 0xC000
OUT_OF_RESOURCES = 0xA700


def _key(*uids: str) -> str:
    return hashlib.sha256("\0".join(uids).encode()).hexdigest()[:24]


class Inbox:
    """Received instances on disk, grouped by series, and which series are due for scoring."""

    def __init__(self, root: Path, quiet_seconds: float = DEFAULT_QUIET_SECONDS) -> None:
        self.root, self.quiet_seconds = Path(root), quiet_seconds
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._last: dict[Path, float] = {}  # series folder -> monotonic time of its newest instance

    def store(self, study_uid: str, series_uid: str, sop_uid: str, data: bytes) -> bool:
        """Write one instance; ``False`` (nothing written) when it is already here."""
        folder = self.root / _key(study_uid, series_uid)
        path = folder / f"{_key(sop_uid)}.dcm"
        if path.exists():
            return False
        folder.mkdir(exist_ok=True)
        atomic_write(path, lambda tmp: tmp.write_bytes(data))
        with self._lock:
            self._last[folder] = time.monotonic()
        return True

    def due(self, now: float | None = None) -> list[Path]:
        """Series quiet for ``quiet_seconds``: taken off the pending list and returned."""
        now = time.monotonic() if now is None else now
        with self._lock:
            ready = [f for f, t in self._last.items() if now - t >= self.quiet_seconds]
            for folder in ready:
                del self._last[folder]
        return ready

    def unscored(self) -> list[Path]:
        """Series whose files differ from what was last scored (a crash mid-ingest, or never scored)."""
        return [f for f in sorted(p for p in self.root.iterdir() if p.is_dir()) if _files(f) != _scored(f)]

    @staticmethod
    def mark_scored(folder: Path, files: Sequence[str]) -> None:
        atomic_write(folder / SCORED, lambda tmp: tmp.write_text(json.dumps(sorted(files))))


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.dcm"))


def _scored(folder: Path) -> list[str] | None:
    try:
        return json.loads((folder / SCORED).read_text())
    except (OSError, ValueError):
        return None


@dataclass
class _Association:
    calling: str
    address: str
    stored: int = 0
    duplicates: int = 0
    failed: int = 0
    started: float = field(default_factory=time.monotonic)


class Listener:
    """The Storage SCP and the thread that scores quiet series onto ``worklist``."""

    def __init__(
        self,
        worklist: Worklist,
        predictor: Scorer,
        inbox: Inbox,
        ae_title: str = DEFAULT_AE_TITLE,
        allow: Sequence[str] = (),
        on_scored: Sequence[Callable[[int], object]] = (),
    ) -> None:
        self.worklist, self.predictor, self.inbox = worklist, predictor, inbox
        self.on_scored = on_scored
        self.ae = AE(ae_title=ae_title)
        for sop_class in ACCEPTED_SOP_CLASSES:
            self.ae.add_supported_context(sop_class, ALL_TRANSFER_SYNTAXES)
        self.ae.add_supported_context(Verification)
        self.ae.require_calling_aet = list(allow)
        self._associations: dict[int, _Association] = {}
        self._stop = threading.Event()
        self._server: ThreadedAssociationServer | None = None
        self._scorer: threading.Thread | None = None

    # ---------------------------------------------------------------- association events

    def _on_established(self, event: evt.Event) -> None:
        requestor = event.assoc.requestor
        self._associations[id(event.assoc)] = _Association(requestor.ae_title, f"{requestor.address}")
        # Senders often offer every storage class they know: one line, the names at debug level.
        refused = sorted({c.abstract_syntax.name for c in event.assoc.rejected_contexts if c.abstract_syntax})
        if refused:
            log.info(
                "AE %r offered %d SOP class(es) refused here (only CT and Enhanced CT images are accepted)%s",
                requestor.ae_title, len(refused), f": {', '.join(refused)}" if len(refused) <= 3 else "",
            )  # fmt: skip
            log.debug("refused SOP classes from AE %r: %s", requestor.ae_title, ", ".join(refused))

    def _on_rejected(self, event: evt.Event) -> None:
        requestor = event.assoc.requestor
        allowed = not self.ae.require_calling_aet or requestor.ae_title.strip() in self.ae.require_calling_aet
        why = "too many associations at once" if allowed else "calling AE title not allowed"
        log.warning("association from AE %r (%s) refused: %s", requestor.ae_title, requestor.address, why)

    def _on_closed(self, event: evt.Event) -> None:
        a = self._associations.pop(id(event.assoc), None)
        if a is not None:
            log.info(
                "association from AE %r (%s): %d stored, %d duplicates ignored, %d failed in %.1f s",
                a.calling, a.address, a.stored, a.duplicates, a.failed, time.monotonic() - a.started,
            )  # fmt: skip

    def _on_store(self, event: evt.Event) -> int:
        counts = self._associations.get(id(event.assoc))
        try:
            ds = event.dataset
            uids = str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)
        except Exception:  # a dataset pydicom cannot parse is the sender's problem: refuse it
            log.warning("an instance without readable study/series/instance UIDs was refused", exc_info=True)
            if counts:
                counts.failed += 1
            return CANNOT_UNDERSTAND
        try:
            new = self.inbox.store(*uids, event.encoded_dataset(include_meta=True))
        except OSError as exc:  # a full or unwritable disk: the sender keeps the instance and may retry
            log.error("could not store an instance: %s", exc.strerror or exc)
            if counts:
                counts.failed += 1
            return OUT_OF_RESOURCES
        if counts:
            counts.stored += new
            counts.duplicates += not new
        return SUCCESS

    # ---------------------------------------------------------------- scoring

    def score(self, folder: Path) -> None:
        """Put one series folder on the worklist (or update its entry) and record what was scored."""
        files = _files(folder)
        started = time.perf_counter()
        report = ingest(self.worklist, self.predictor, [folder], source="dicom")
        for problem in report.problems:
            log.warning("series %s: %s", folder.name, problem.reason)
        for study_id in report.added:
            entry = self.worklist.study(study_id)
            log.info(
                "series %s: worklist id %d, %d slices, likelihood %.3f%s, %.1f s",
                folder.name, study_id, entry.n_slices, entry.score or 0.0, ", FLAGGED" if entry.flagged else "",
                time.perf_counter() - started,
            )  # fmt: skip
            for callback in self.on_scored:
                try:
                    callback(study_id)
                except Exception:  # a failed webhook or PACS send must not lose the scored series
                    log.exception("after scoring worklist id %d: %s failed", study_id, type(callback).__name__)
        Inbox.mark_scored(folder, files)

    def _score_loop(self, poll_seconds: float) -> None:
        for folder in self.inbox.unscored():  # received before a crash or restart
            self._score_safely(folder)
        while not self._stop.wait(poll_seconds):
            for folder in self.inbox.due():
                self._score_safely(folder)

    def _score_safely(self, folder: Path) -> None:
        try:
            self.score(folder)
        except Exception:  # one series must not stop the listener; it stays unscored and is retried at restart
            log.exception("series %s could not be scored", folder.name)

    # ---------------------------------------------------------------- lifecycle

    def start(self, host: str = "127.0.0.1", port: int = DEFAULT_PORT, poll_seconds: float = 0.5) -> int:
        """Start listening (port 0: any free port) and scoring in the background; returns the port."""
        handlers: list[Any] = [
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_C_ECHO, lambda event: SUCCESS),
            (evt.EVT_ESTABLISHED, self._on_established),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_RELEASED, self._on_closed),
            (evt.EVT_ABORTED, self._on_closed),
        ]
        server = self._server = self.ae.start_server((host, port), block=False, evt_handlers=handlers)
        assert server is not None  # block=False always returns the server
        bound = int(server.server_address[1])
        self._scorer = threading.Thread(target=self._score_loop, args=(poll_seconds,), name="ich-scorer", daemon=True)
        self._scorer.start()
        log.info("listening as AE %r on %s:%d", self.ae.ae_title, host, bound)
        return bound

    def stop(self) -> None:
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()
        if self._scorer is not None:
            self._scorer.join()


class SendResults:
    """``on_scored`` callback: the SR and key image of a scored series (:func:`ich.results.study_objects`),
    C-STORE'd to ``destination`` (AE@host:port).

    ``heatmap(hu)`` gives the key image's overlay (e.g. Grad-CAM of "any"); without it the slice is plain.
    """

    def __init__(
        self,
        worklist: Worklist,
        destination: str,
        heatmap: Callable[[np.ndarray], np.ndarray] | None = None,
        aggregation: str = "",
    ) -> None:
        results.parse_destination(destination)  # refuse a malformed destination at start, not at the first study
        self.worklist, self.destination = worklist, destination
        self.heatmap, self.aggregation = heatmap, aggregation

    def objects(self, study_id: int) -> list[Dataset]:
        """``[SR, secondary capture]`` for one worklist entry."""
        return results.study_objects(self.worklist, study_id, self.heatmap, self.aggregation)

    def __call__(self, study_id: int) -> list[int]:
        return results.send(self.objects(study_id), self.destination)
