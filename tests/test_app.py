"""The Streamlit app, headless (streamlit.testing AppTest): demo worklist, viewer, reads, upload."""

from __future__ import annotations

import functools
import gzip
import io
import json
import re
import sqlite3
import threading
import time
import zipfile

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from pydicom.uid import generate_uid
from streamlit.testing.v1 import AppTest

import ich.worklist
from ich.dashboard.resources import demo_seeding
from ich.labels import CLASSES, write_rsna_csv
from ich.worklist import STATUS_HEMORRHAGE, Worklist
from tests.dicom_factory import make_ct, to_bytes
from tests.helpers import ROOT, add

TIMEOUT = 180  # first run seeds the demo: phantoms + scoring on a shared CI core
DEMO = len(ich.worklist.DEMO_CASES)


@pytest.fixture
def data_dir(tmp_path, monkeypatch, tiny_checkpoint):
    """An empty data directory and the tiny checkpoint; demo phantoms at 96 px so seeding takes seconds."""
    monkeypatch.setenv("ICH_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("ICH_WEIGHTS", str(tiny_checkpoint))
    monkeypatch.setattr(ich.worklist, "seed_demo", functools.partial(ich.worklist.seed_demo, size=96))
    return tmp_path / "data"


def start() -> AppTest:
    return settled(AppTest.from_file(str(ROOT / "streamlit_app.py"), default_timeout=TIMEOUT).run())


def settled(at: AppTest) -> AppTest:
    """``at`` once the demo seeding (started in the background at first start) has finished, run again: the
    worklist as a reader finds it then."""
    assert not at.exception, at.exception
    seeding = demo_seeding(str(ich.worklist.data_dir()))
    if seeding.started:
        deadline = time.monotonic() + TIMEOUT
        while seeding.running and time.monotonic() < deadline:
            time.sleep(0.1)
        assert seeding.done and not seeding.problems, seeding.problems
        at.run()
        assert not at.exception, at.exception
    return at


def texts(at: AppTest) -> str:
    return "\n".join(m.value for m in at.markdown)


def shown(at: AppTest) -> str:
    """Every text the page shows: messages, tables, study choices, image captions."""
    parts = [
        str(e.value) for kind in (at.markdown, at.caption, at.success, at.warning, at.error, at.info) for e in kind
    ]
    parts += [d.value.to_csv() for d in at.dataframe]
    parts += [" ".join(map(str, box.options)) for box in at.selectbox]
    parts += [" ".join(image.captions) for image in at.image]
    return "\n".join(parts)


def test_first_start_fills_demo_worklist_in_likelihood_order(data_dir):
    at = start()
    assert any("Not a medical device" in w.value for w in at.warning)
    table = at.dataframe[0].value
    assert len(table) == DEMO and table["Study"].str.match(r"Demo \d+ · \d+ slices").all()
    assert table["Likelihood"].is_monotonic_decreasing
    assert set(table["Status"]) == {"new"}
    # A restart finds the same worklist, with reads made meanwhile, and does not seed again.
    wl = Worklist(data_dir)
    wl.save_review(int(wl.studies().iloc[-1]["id"]), True, ["epidural"])
    at = start()
    assert len(at.dataframe[0].value) == DEMO and len(wl) == DEMO
    at.segmented_control(key="status_filter").set_value(STATUS_HEMORRHAGE).run()
    assert at.dataframe[0].value["Status"].tolist() == [STATUS_HEMORRHAGE]


def viewer_args(at: AppTest) -> dict:
    """What the page handed the browser slice viewer (the component's arguments; bytes by name, or None)."""
    (proto,) = [e.proto for e in at.get("component_instance") if e.proto.component_name.endswith("slice_viewer")]
    return json.loads(proto.json_args) | {a.key: a.bytes for a in proto.special_args}


def viewer_answers(at: AppTest, key: str) -> dict:
    """The browser's first answer to the viewer (it got the preview; it holds no volume yet), and the args of
    the rerun that answer causes: the volume comes then."""
    first = viewer_args(at)
    assert first["volume"] is None and first["preview"][:8] == b"\x89PNG\r\n\x1a\n", "only the preview first"
    at.session_state[key] = {"slice": first["goto"], "seq": 0, "have": None, "have_heatmap": None}
    at.run()
    assert not at.exception, at.exception
    args = viewer_args(at)
    assert args["volume"] is not None and args["preview"] is None and args["goto_nonce"] == first["goto_nonce"]
    return args


def downloads(at: AppTest) -> dict[str, bytes]:
    """The page's download buttons: label -> the file's bytes, as they reach the browser."""
    found = [e.proto for e in at.get("component_instance") if e.proto.component_name.endswith("download_button")]
    return {json.loads(p.json_args)["label"]: next(a.bytes for a in p.special_args if a.key == "data") for p in found}


def click_download(at: AppTest, key: str) -> None:
    """What the browser reports after a click on download button ``key``: a new value (the click's time)."""
    at.session_state[key] = time.time()
    at.run()


def test_viewer_follows_the_browser_viewer_windows_heatmap_and_read(data_dir):
    at = start()
    top = at.dataframe[0].value.iloc[0]["Study"]
    study_id = int(Worklist(data_dir).studies().iloc[0]["id"])
    next(b for b in at.button if b.label.startswith("Open ")).click().run()
    assert not at.exception, at.exception
    assert at.selectbox(key="study").value == study_id
    n = int(top.split("·")[1].split()[0])

    assert any(e.label == "What these numbers mean" for e in at.expander)
    assert "flagged at a likelihood of 50% or more" in texts(at)  # the tiny checkpoint's default threshold
    args = viewer_answers(at, f"viewer-{study_id}")
    assert args["n"] == n and len(args["locations"]) == n and len(args["notes"]) == n
    assert args["window"] == {"name": "brain", "level": 40.0, "width": 80.0} and args["heatmap"] is None
    assert args["notes"][0].startswith("model: any ") and "called" in args["notes"][0]
    assert re.fullmatch(r"[0-9a-f]{24}", args["volume_id"])  # a hash: no UID, no study number
    # The study travels in the session's own message (bytes), not as a URL any client could fetch.
    served = nib.Nifti1Image.from_bytes(gzip.decompress(args["volume"]))
    assert served.shape[2] == n and served.get_data_dtype() == np.int16

    # The reader settles on slice 3 in the browser, which holds the study now: the side panel follows,
    # without moving the viewer, and the study is not sent again.
    at.session_state[f"viewer-{study_id}"] = {"slice": 3, "seq": 1, "have": args["volume_id"], "have_heatmap": None}
    at.run()
    assert "**Slice 3 / " in texts(at)
    assert "pred:" in texts(at) and "actual:" in texts(at)  # phantom labels give every slice an actual
    assert viewer_args(at)["goto_nonce"] == args["goto_nonce"] and viewer_args(at)["volume"] is None
    # "Show" on a gallery card is a request: the viewer is told to go there.
    show = next(b for b in at.button if (b.key or "").startswith("go-"))
    target = int(show.key.removeprefix("go-")) + 1
    show.click().run()
    moved = viewer_args(at)
    assert moved["goto"] == target and moved["goto_nonce"] == args["goto_nonce"] + 1
    assert f"**Slice {target} / " in texts(at)

    at.segmented_control(key="window").set_value("bone").run()
    assert viewer_args(at)["window"] == {"name": "bone", "level": 600.0, "width": 2800.0}

    at.toggle(key="heatmap").set_value(True).run()
    assert not at.exception, at.exception
    heat = viewer_args(at)
    assert re.fullmatch(r"[0-9a-f]{24}", heat["heatmap_id"]) and heat["heatmap_label"] == "any"
    cams = nib.Nifti1Image.from_bytes(gzip.decompress(heat["heatmap"]))
    assert cams.shape[2] == n and cams.get_data_dtype() == np.uint8

    # A contradictory read is refused, and what made it contradictory does not linger into the next save.
    at.radio(key=f"hem-{study_id}").set_value("no")
    at.multiselect(key=f"sub-{study_id}").set_value(["epidural"])
    next(b for b in at.button if b.label == "Save read").click().run()
    assert any("cannot name subtypes" in e.value for e in at.error)
    assert at.multiselect(key=f"sub-{study_id}").value == [] and not Worklist(data_dir).study(study_id).read

    at.radio(key=f"hem-{study_id}").set_value("yes")
    at.multiselect(key=f"sub-{study_id}").set_value(["subdural"])
    at.multiselect(key=f"marks-{study_id}").set_value([3, n])
    at.checkbox(key=f"others-clear-{study_id}").check()
    next(b for b in at.button if b.label == "Save read").click().run()
    assert not at.exception, at.exception
    assert any("Read saved" in s.value for s in at.success)
    # Per question: the hemorrhage line and the subtype line, each with its own colour.
    assert ":green[hemorrhage: yes / yes ✓]" in texts(at) or ":red[hemorrhage: no / yes ✗]" in texts(at)
    assert "radiologist's read" in texts(at)
    assert any("Not a medical device" in w.value for w in at.warning)

    with sqlite3.connect(data_dir / "worklist.sqlite3") as db:
        status = db.execute("SELECT status FROM studies WHERE id = ?", (study_id,)).fetchone()[0]
        read = db.execute(
            "SELECT hemorrhage, subtypes, slice_marks FROM reviews WHERE study_id = ?", (study_id,)
        ).fetchall()
    assert status == STATUS_HEMORRHAGE
    assert read == [(1, '["subdural"]', f"[2, {n - 1}]")]
    slices = Worklist(data_dir).slices(study_id)
    assert slices["truth"].eq("review").all() and slices["y_subdural"].sum() == 2


def test_upload_scores_series_and_lists_bad_files(data_dir):
    at = start()
    next(b for b in at.button if b.label == "Upload studies").click().run()
    study, series = generate_uid(), generate_uid()
    slices = [make_ct(z=5.0 * i, series_uid=series, study_uid=study, instance=i + 1) for i in range(4)]
    labels = pd.DataFrame(0, index=[s.SOPInstanceUID for s in slices], columns=list(CLASSES))
    csv = io.StringIO()
    write_rsna_csv(labels, csv)
    files = [(f"{i}.dcm", to_bytes(s), "application/dicom") for i, s in enumerate(slices)]
    files.append(("broken.dcm", b"\0" * 50, "application/dicom"))
    at.file_uploader[0].set_value(files)
    at.file_uploader[1].set_value(("labels.csv", csv.getvalue().encode(), "text/csv")).run()
    next(b for b in at.button if b.label == "Score and add to worklist").click().run()
    assert not at.exception, at.exception
    assert any("1 exam added" in s.value for s in at.success)
    added, problems = at.dataframe[0].value, at.dataframe[1].value
    assert added["Slices"].tolist() == [4] and added["Study"].str.startswith("Study ").all()
    assert problems["file"].tolist() == ["broken.dcm"]
    studies = Worklist(data_dir).studies()
    assert len(studies) == DEMO + 1 and (~studies["demo"]).sum() == 1
    uploaded = int(studies.loc[~studies["demo"], "id"].iloc[0])
    assert Worklist(data_dir).slices(uploaded)["truth"].eq("csv").all()

    # No patient identifier or DICOM UID on the upload page or in the viewer of the new study.
    identifiers = ["DOE", "JANE", "TEST-0001", study, series, *(s.SOPInstanceUID for s in slices)]
    assert not [i for i in identifiers if i in shown(at)]
    at = start()
    next(b for b in at.button if b.label.startswith("Open ")).click().run()
    at.selectbox(key="study").set_value(uploaded).run()
    assert not at.exception, at.exception
    assert "**Slice " in texts(at) and "(label CSV)" in texts(at)  # the viewer shows the uploaded study
    assert "· uploaded ·" in texts(at)
    assert not [i for i in identifiers if i in shown(at)]


def test_a_flagged_study_arriving_meanwhile_is_announced(data_dir):
    at = start()
    assert not at.toast  # what was there at start is not news
    wl = Worklist(data_dir)
    flagged, _ = add(wl, 0.97)
    add(wl, 0.05)  # a clear one arrives too: no toast for it
    at.run()
    label = wl.study(flagged).label
    assert [t.value for t in at.toast] == [f"Flagged: {label} (97% likelihood)"]
    at.run()
    assert not at.toast  # announced once


@pytest.fixture
def with_users(data_dir, monkeypatch):
    """Sign-in configured: a reader and an admin."""
    from ich import access

    path = data_dir / "auth.yaml"
    access.add_user("rita", "reader-pass-1", "reader", path)
    access.add_user("adam", "admin-pass-1", "admin", path)
    return access.AuditLog(data_dir / "audit.log")


def sign_in(at: AppTest, name: str, password: str) -> AppTest:
    at.text_input[0].input(name)
    at.text_input[1].input(password)
    return settled(next(b for b in at.button if b.label == "Login").click().run())  # signed in: the demo seeds


def test_signed_out_client_gets_only_the_sign_in_form(with_users):
    at = start()
    assert not at.dataframe and not at.selectbox and len(at.text_input) == 2  # no worklist, no study names
    at = sign_in(at, "rita", "wrong password")
    assert any("Wrong user name or password" in e.value for e in at.error) and not at.dataframe


def test_reader_reads_but_cannot_delete_and_every_action_is_audited(with_users):
    at = sign_in(start(), "rita", "reader-pass-1")
    assert at.dataframe and "Signed in as **rita** (reader)" in shown(at)
    exported = downloads(at)["Download worklist (CSV)"].decode()  # in the session's message, not at a URL
    assert len(pd.read_csv(io.StringIO(exported))) == DEMO
    click_download(at, "export-worklist")
    assert ("rita", "export") in [(e["user"], e["action"]) for e in with_users.entries()]
    next(b for b in at.button if b.label.startswith("Open ")).click().run()
    assert not at.exception, at.exception
    assert not [e for e in at.expander if e.label.startswith("Delete")]
    actions = [(e["user"], e["action"]) for e in with_users.entries()]
    assert actions[:3] == [("rita", "sign-in"), ("rita", "export"), ("rita", "open")]
    assert all(set(e) == {"time", "user", "action", "study"} for e in with_users.entries())


def test_admin_deletes_a_study_after_confirming(with_users, data_dir):
    at = sign_in(start(), "adam", "admin-pass-1")
    next(b for b in at.button if b.label.startswith("Open ")).click().run()
    study_id = at.selectbox(key="study").value
    delete = next(b for b in at.button if b.label == "Delete")
    assert delete.disabled  # not before the confirmation
    at.checkbox(key=f"delete-sure-{study_id}").check().run()
    next(b for b in at.button if b.label == "Delete").click().run()
    assert not at.exception, at.exception
    assert study_id not in set(Worklist(data_dir).studies()["id"])
    assert ("adam", "delete", study_id) in [(e["user"], e["action"], e["study"]) for e in with_users.entries()]


def test_server_beyond_localhost_without_sign_in_refuses(data_dir):
    from streamlit import config

    config.set_option("server.address", "0.0.0.0")
    try:
        at = start()
    finally:
        config.set_option("server.address", "127.0.0.1")
    assert any("without sign-in" in e.value for e in at.error) and not at.dataframe


def test_a_link_with_a_study_opens_it_in_the_viewer(data_dir):
    start()  # seeds the demo worklist
    wanted = int(Worklist(data_dir).studies()["id"].iloc[-1])
    at = AppTest.from_file(str(ROOT / "streamlit_app.py"), default_timeout=TIMEOUT)
    at.query_params["study"] = str(wanted)
    at.run()
    assert not at.exception, at.exception
    assert at.selectbox(key="study").value == wanted and "**Slice " in texts(at)


def test_no_demo_studies_where_real_ones_already_arrived(tmp_path, monkeypatch, tiny_checkpoint):
    monkeypatch.setenv("ICH_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("ICH_WEIGHTS", str(tiny_checkpoint))
    add(Worklist(tmp_path / "data"), 0.8)  # e.g. from the DICOM listener
    start()
    assert len(Worklist(tmp_path / "data")) == 1


def test_identifiers_only_for_signed_in_users_after_an_admin_turns_them_on(with_users, data_dir):
    wl = Worklist(data_dir)
    at = sign_in(start(), "adam", "admin-pass-1")
    assert "Patient ID" not in at.dataframe[0].value.columns
    at.toggle(key="identifiers_on").set_value(True).run()
    add(wl, 0.99)  # a study arriving with identifiers on
    at.run()
    table = at.dataframe[0].value
    assert "TEST-0001" in table["Patient ID"].tolist()
    assert ("adam", "identifiers-on") in [(e["user"], e["action"]) for e in with_users.entries()]
    reader = sign_in(start(), "rita", "reader-pass-1")
    assert "TEST-0001" in reader.dataframe[0].value["Patient ID"].tolist()
    assert not [t for t in reader.toggle if t.key == "identifiers_on"]  # readers cannot change it
    assert "TEST-0001" not in shown(start())  # signed out: the sign-in form only


def test_without_sign_in_identifiers_stay_hidden(data_dir):
    Worklist(data_dir).set_identifiers(True)
    at = start()
    add(Worklist(data_dir), 0.99)
    at.run()
    assert "Patient ID" not in at.dataframe[0].value.columns and "TEST-0001" not in shown(at)


def test_reader_downloads_dicom_results_and_it_is_audited(with_users, data_dir):
    at = sign_in(start(), "rita", "reader-pass-1")
    next(b for b in at.button if b.label.startswith("Open ")).click().run()
    study_id = at.selectbox(key="study").value
    label = "Prepare results for PACS (DICOM SR + key image)"
    assert "identifiers from the original headers" in shown(at)
    next(b for b in at.button if b.label == label).click().run()
    assert not at.exception, at.exception
    with zipfile.ZipFile(io.BytesIO(downloads(at)["Download results for PACS (.zip)"])) as zf:
        assert len([n for n in zf.namelist() if n.endswith(".dcm")]) == 2

    def exports() -> int:
        return [(e["user"], e["action"], e["study"]) for e in with_users.entries()].count(("rita", "export", study_id))

    before = exports()
    click_download(at, f"export-results-{study_id}")
    assert exports() == before + 1
    at.run()  # a rerun without a new click audits nothing
    assert exports() == before + 1
    record = Worklist(data_dir).study(study_id)
    (data_dir / "headers" / record.header_file).unlink()  # as for a study stored before headers were kept
    at = sign_in(start(), "rita", "reader-pass-1")
    next(b for b in at.button if b.label.startswith("Open ")).click().run()
    assert not [b for b in at.button if b.label == label] and "upload it again" in shown(at)


def test_viewer_leaves_a_subtype_the_model_does_not_name_out_of_its_calls(tmp_path, monkeypatch, tiny_checkpoint):
    from ich.labels import NOT_NAMED
    from tests.helpers import FakePrediction, series_of

    monkeypatch.setenv("ICH_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("ICH_WEIGHTS", str(tiny_checkpoint))
    series = series_of(4)
    probs = np.full((4, len(CLASSES)), 0.9, np.float32)  # every class well above its threshold
    thresholds = dict.fromkeys(CLASSES, 0.5) | {"epidural": NOT_NAMED}
    study_id = Worklist(tmp_path / "data").add_study(
        series, FakePrediction(series.sop_uids, probs, 0.9, "subdural", True), thresholds=thresholds, model="fake"
    )
    at = AppTest.from_file(str(ROOT / "streamlit_app.py"), default_timeout=TIMEOUT)
    at.query_params["study"] = str(study_id)
    at.run()
    assert not at.exception, at.exception
    (table,) = [d.value for d in at.dataframe if "threshold" in d.value.columns]
    cut = table.set_index("class")["threshold"]
    assert cut["epidural"] == "not named" and (cut.drop("epidural") == "50.0%").all()  # never "None" on screen
    note = viewer_args(at)["notes"][0]
    assert note.endswith("called hemorrhage (IPH, IVH, SAH, SDH)") and "EDH" not in note


def test_worklist_shows_failed_exams_and_the_viewer_each_series_of_an_exam(data_dir, monkeypatch):
    import datetime as dt

    from ich.exam import SeriesChoice
    from tests.helpers import FakePrediction, series_of

    monkeypatch.setenv("ICH_DEMO", "0")
    wl = Worklist(data_dir)
    series, bone = series_of(4), series_of(3)
    choices = [
        SeriesChoice(series.series_uid, 2, "Head 5mm soft", 4, 5.0, "H30s", "axial", True, ""),
        SeriesChoice("1.2.3", 1, "Topogram", 1, None, "H30s", "coronal", False, "localizer (scout)"),
        SeriesChoice(bone.series_uid, 3, "Head 5mm bone", 3, 5.0, "H70h", "axial", False, "bone kernel (H70h)"),
    ]
    probs = np.full((4, len(CLASSES)), 0.2, np.float32)
    study_id = wl.add_study(series, FakePrediction(series.sop_uids, probs, 0.2, None, False), exam_series=choices)
    assert wl.add_other_series(series.study_uid, bone)  # kept for the viewer; the scout was not
    retry = dt.datetime.now().astimezone() + dt.timedelta(minutes=2)
    wl.intake_failed("0123abcd", "OSError: [Errno 28] No space left on device", retry)
    at = start()
    assert "No space left on device" in shown(at) and "received but not on the worklist" in str(at.expander)
    next(b for b in at.button if b.label == "Remove this exam and its received files").click().run()
    assert wl.intake().empty  # the local user is an admin
    at = start()
    next(b for b in at.button if b.label.startswith("Open ")).click().run()
    assert "Topogram" in shown(at) and "not scored: localizer (scout)" in shown(at)
    assert viewer_args(at)["n"] == 4
    box = at.selectbox(key=f"series-{study_id}")  # the scored series and the one kept besides it
    assert len(box.options) == 2 and "Head 5mm bone" in box.options[1] and "scored" in box.options[0]
    box.select(choices[2]).run()
    assert not at.exception, at.exception
    args = viewer_args(at)  # the bone series' own images, without the model's notes or a heatmap
    assert args["n"] == 3 and args["notes"] == ["not scored"] * 3 and args["heatmap"] is None
    assert "Not scored by the model: bone kernel (H70h)" in shown(at)
    assert "Slice " in texts(at)  # the scored series' numbers stay beside it


def test_open_opens_the_clicked_study_after_the_worklist_was_re_sorted(data_dir):
    """Issue 23: the click named a row position, applied to a list queried again; an arrival in between
    opened another patient's study."""
    at = start()
    wl = Worklist(data_dir)
    shown = at.dataframe[0].value
    first_id = int(shown["Open"].iloc[0].removeprefix("Open "))
    assert shown["Study"].iloc[0] == wl.study(first_id).label
    arrived, _ = add(wl, 0.99)  # a flagged arrival sorts first from the next run on
    at.session_state["open-row-None"] = {"row": 0, "label": shown["Open"].iloc[0]}  # the reader's click on row 0
    at.run()
    assert not at.exception, at.exception
    assert at.selectbox(key="study").value == first_id != arrived


def test_the_worklist_shows_at_once_while_the_demo_seeds_once_in_the_background(data_dir, monkeypatch):
    """Issue 23: first start scored the demo studies before the page showed anything (minutes on a CPU)."""
    gate, calls = threading.Event(), []
    fast_seed = ich.worklist.seed_demo  # the fixture's

    def held_seed(wl: Worklist, pred, progress) -> ich.worklist.IngestReport | None:
        calls.append(wl)

        def step(fraction: float, text: str) -> None:
            progress(fraction, text)
            if len(wl):  # the first demo study is on the worklist: the rest waits for the test
                gate.wait(TIMEOUT)

        return fast_seed(wl, pred, progress=step)

    monkeypatch.setattr(ich.worklist, "seed_demo", held_seed)
    wl = Worklist(data_dir)
    try:
        at = AppTest.from_file(str(ROOT / "streamlit_app.py"), default_timeout=TIMEOUT).run()
        assert not at.exception, at.exception
        deadline = time.monotonic() + TIMEOUT
        while not len(wl) and time.monotonic() < deadline:
            time.sleep(0.1)
        at.run()  # what the page's progress fragment does as a study joins the worklist
        assert len(at.dataframe[0].value) == 1 and "Unread studies first" in shown(at)
        (bar,) = at.get("progress")
        assert bar.proto.text.startswith("First start: preparing demo studies — study 1 of")
        # A second session at first start sees the same seeding; another server finds the store claimed.
        other = AppTest.from_file(str(ROOT / "streamlit_app.py"), default_timeout=TIMEOUT).run()
        assert not other.exception and len(other.dataframe[0].value) == 1 and other.get("progress")
        assert len(calls) == 1 and wl.get_meta(ich.worklist.intake.DEMO_SEEDED) == ich.worklist.intake.DEMO_RUNNING
        assert ich.worklist.intake.seed_demo(wl, predictor=None) is None  # refused before any scoring
    finally:
        gate.set()
    at = settled(at)
    assert len(at.dataframe[0].value) == DEMO and not at.get("progress") and len(calls) == 1


def test_a_thin_series_is_read_as_the_slabs_the_model_scored_with_its_thin_slices_on_demand(tmp_path, monkeypatch):
    """24 slices 0.625 mm apart: the viewer gets 3 slabs (each the mean of its 8 slices); settling on a slab
    shows its numbers and marks all its slices; "Thin slices" gives every slice back."""
    from ich import dicom
    from tests.helpers import FakePrediction

    monkeypatch.setenv("ICH_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("ICH_DEMO", "0")
    study, uid = generate_uid(), generate_uid()
    files = [
        dicom.Upload(f"{i}.dcm", to_bytes(make_ct(z=0.625 * i, study_uid=study, series_uid=uid, instance=i + 1)))
        for i in range(24)
    ]
    (series,) = dicom.load(files).series
    probs = np.full((24, len(CLASSES)), 0.1, np.float32)
    probs[8:16, 0] = 0.9  # the second slab bleeds
    study_id = Worklist(tmp_path / "data").add_study(
        series, FakePrediction(series.sop_uids, probs, 0.9, "subdural", True), thresholds=dict.fromkeys(CLASSES, 0.5)
    )
    at = AppTest.from_file(str(ROOT / "streamlit_app.py"), default_timeout=TIMEOUT)
    at.query_params["study"] = str(study_id)
    at.run()
    assert not at.exception, at.exception
    args = viewer_answers(at, f"viewer-{study_id}")
    assert args["n"] == 3 and args["unit"] == "Slab" and args["spans"] == [[1, 8], [9, 16], [17, 24]]
    assert args["goto"] == 2  # the most suspicious slice (9) lies in slab 2
    slabs = nib.Nifti1Image.from_bytes(gzip.decompress(args["volume"]))
    assert slabs.shape[2] == 3
    assert "**Slab 2 / 3 (slices 9–16)** — " in texts(at)

    at.session_state[f"viewer-{study_id}"] = {"slice": 3, "seq": 1, "have": args["volume_id"], "have_heatmap": None}
    at.run()
    assert "**Slab 3 / 3 (slices 17–24)** — " in texts(at)
    next(b for b in at.button if b.label.startswith("Mark slab")).click().run()
    assert at.multiselect(key=f"marks-{study_id}").value == list(range(17, 25))

    at.toggle(key="thin").set_value(True).run()
    thin = viewer_args(at)
    assert thin["n"] == 24 and thin["unit"] == "Slice" and thin["spans"] is None
    assert thin["volume_id"] != args["volume_id"] and thin["goto"] == 17  # the slab's first slice
    assert "**Slice 17 / 24** — " in texts(at)
