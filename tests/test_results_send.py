"""ich.listener.SendResults against a Storage SCP on loopback standing in for PACS: the listener's AE title
calls, a re-send replaces the last accepted results, and a refused send records nothing."""

from __future__ import annotations

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ComprehensiveSRStorage, SecondaryCaptureImageStorage
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt

from ich import results
from ich.listener import DEFAULT_AE_TITLE, SendResults
from ich.worklist import Worklist, ingest
from tests.helpers import FakePredictor, uploads

OUT_OF_RESOURCES = 0xA700


@pytest.fixture
def pacs():
    """A Storage SCP keeping ``(calling AE title, dataset)`` of each object; ``answers`` are the statuses
    it gives, in order (success once they run out)."""
    received: list[tuple[str, Dataset]] = []
    answers: list[int] = []

    def keep(event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        received.append((event.assoc.requestor.ae_title, ds))
        return answers.pop(0) if answers else 0

    ae = AE(ae_title="PACS")
    for sop_class in (ComprehensiveSRStorage, SecondaryCaptureImageStorage):
        ae.add_supported_context(sop_class, ALL_TRANSFER_SYNTAXES)
    server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, keep)])
    yield f"PACS@127.0.0.1:{server.server_address[1]}", received, answers
    server.shutdown()


def test_results_call_as_the_listeners_ae_title_and_a_resend_replaces_them(tmp_path, pacs):
    destination, received, _ = pacs
    wl = Worklist(tmp_path)
    (study_id,) = ingest(wl, FakePredictor({"any": 0.9}), uploads(3)).added
    assert SendResults(wl, destination).calling_ae == DEFAULT_AE_TITLE
    sender = SendResults(wl, destination, calling_ae="ICH-CT-TRIAGE")
    assert sender(study_id) == [0, 0]
    assert sender(study_id) == [0, 0]  # the series grew and was scored again, say
    assert {calling for calling, _ in received} == {"ICH-CT-TRIAGE"}
    sr1, sc1, sr2, sc2 = (ds for _, ds in received)  # each send: the SR, then the key image
    assert (sr1.Modality, sc1.Modality) == ("SR", "OT")
    assert (sr2.SeriesInstanceUID, sc2.SeriesInstanceUID) == (sr1.SeriesInstanceUID, sc1.SeriesInstanceUID)
    assert (sr1.InstanceNumber, sr2.InstanceNumber, sc2.InstanceNumber) == (1, 2, 2)
    predecessor = sr2.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert predecessor.ReferencedSOPInstanceUID == sr1.SOPInstanceUID
    assert results.last_sent(wl, sr2.StudyInstanceUID).sr_sop_uid == sr2.SOPInstanceUID


def test_a_refused_send_records_nothing_and_the_retry_replaces_the_last_accepted(tmp_path, pacs, caplog):
    destination, received, answers = pacs
    wl = Worklist(tmp_path)
    (study_id,) = ingest(wl, FakePredictor({"any": 0.9}), uploads(3)).added
    sender = SendResults(wl, destination)
    assert sender(study_id) == [0, 0]
    first = results.last_sent(wl, received[0][1].StudyInstanceUID)
    answers.append(OUT_OF_RESOURCES)  # PACS refuses the next SR
    assert sender(study_id) == [OUT_OF_RESOURCES, 0]
    assert results.last_sent(wl, received[0][1].StudyInstanceUID) == first and "refused" in caplog.text
    assert sender(study_id) == [0, 0]
    retry = received[-2][1]  # the SR goes first
    assert retry.InstanceNumber == 2 and retry.SeriesInstanceUID == first.sr_series_uid
    predecessor = retry.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert predecessor.ReferencedSOPInstanceUID == first.sr_sop_uid  # not the refused one


def test_no_answer_records_nothing(tmp_path):
    wl = Worklist(tmp_path)
    (study_id,) = ingest(wl, FakePredictor({"any": 0.9}), uploads(3)).added
    with pytest.raises(ConnectionError):
        SendResults(wl, "PACS@127.0.0.1:9")(study_id)  # the discard port: nothing listens
    assert not (tmp_path / results.RESULTS_DIR).exists()


def test_a_crash_after_sending_but_before_the_exam_is_marked_done_sends_a_replacement_not_nothing(tmp_path, pacs):
    """score_exam runs the results callbacks before it marks the exam done: a process dying in between
    (here a BaseException after the send, which nothing catches, as a kill would stop it) leaves the exam
    unscored, and the restart scores it again and sends results that replace the first ones."""
    from ich.listener import Inbox, score_exam
    from tests.dicom_factory import to_bytes
    from tests.test_listener import series

    destination, received, _ = pacs
    wl, inbox = Worklist(tmp_path), Inbox(tmp_path / "inbox")
    for ds in series(3):
        inbox.store(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, to_bytes(ds))
    (folder,) = inbox.unscored()
    sender = SendResults(wl, destination)

    class Killed(BaseException):
        pass

    def killed(_: int) -> None:
        raise Killed

    with pytest.raises(Killed):
        score_exam(wl, FakePredictor({"any": 0.9}), folder, [sender, killed])
    assert len(received) == 2 and inbox.unscored() == [folder]  # sent, but not marked done
    (study_id,) = score_exam(wl, FakePredictor({"any": 0.9}), folder, [sender])  # the restart
    assert len(wl) == 1 and not inbox.unscored() and len(received) == 4
    first, again = received[0][1], received[2][1]
    assert again.InstanceNumber == 2 and again.SeriesInstanceUID == first.SeriesInstanceUID
    predecessor = again.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert predecessor.ReferencedSOPInstanceUID == first.SOPInstanceUID
    assert wl.study(study_id).updated  # scored twice: the row says so
