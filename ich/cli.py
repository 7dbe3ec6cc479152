"""``python -m ich <command>``: the command-line entry points.

Each command imports what it needs when it runs, so ``ich info`` stays free of torch.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

EXIT_OK = 0
EXIT_NOTHING_USABLE = 2


def _info(args: argparse.Namespace) -> int:
    from ich import dicom

    result = dicom.load(args.paths, pixels=False)
    if args.json:
        print(
            json.dumps(
                {
                    "series": [s.summary() for s in result.series],
                    "problems": [{"path": p.path, "reason": p.reason} for p in result.problems],
                },
                indent=2,
            )
        )
    else:
        for s in result.series:
            info = s.summary()
            spacing = "?" if info["spacing"] is None else f"{info['spacing']:.2f} mm"
            print(f"study {info['study_uid']}  series {info['series_uid']}")
            print(
                f"  {info['modality']}  {info['slices']} slices  {info['rows']}x{info['columns']}  "
                f"spacing {spacing}  thickness {info['thickness']}  bits {info['bits_stored']}  "
                f"ordered by {info['ordered_by']}"
            )
            for note in info["notes"]:
                print(f"  note: {note}")
        if result.problems:
            print(f"{len(result.problems)} problem(s):", file=sys.stderr)
            for p in result.problems:
                print(f"  {p}", file=sys.stderr)
        print(
            f"{len(result.series)} series, {sum(len(s) for s in result.series)} slices, {len(result.problems)} problem(s)"
        )
    return EXIT_OK if result.series else EXIT_NOTHING_USABLE


def _phantom(args: argparse.Namespace) -> int:
    from ich import phantom

    frame = phantom.write_dataset(
        Path(args.out),
        args.studies,
        args.seed,
        thickness=args.thickness,
        bits=args.bits,
        jpeg=args.jpeg,
        masks=args.masks,
    )
    positives = int(frame.groupby("study_uid")["any"].max().sum())
    print(
        f"wrote {frame['study_uid'].nunique()} studies ({positives} with hemorrhage), {len(frame)} slices to {args.out}"
    )
    return EXIT_OK


def _predictor(args: argparse.Namespace):
    from ich.inference import Predictor

    # Only `predict` has --engine; the other commands follow $ICH_ENGINE.
    return Predictor.from_checkpoint(args.weights, args.device, engine_name=getattr(args, "engine", None))


def _score(predictor, paths: Sequence, quiet: bool, every_series: bool):
    """``evaluate.predict`` with every skipped file and exam on stderr; ``None`` when no slice was scored."""
    from ich import evaluate

    result = evaluate.predict(predictor, paths, progress=not quiet, every_series=every_series)
    for p in result.problems:
        print(f"skipped {p}", file=sys.stderr)
    if result.frame.empty:
        print("no readable slice found", file=sys.stderr)
        return None
    return result


def exams_path(submission: Path) -> Path:
    """Where ``ich predict`` writes the exam-level CSV: beside the submission, ``<name>_exams.csv``."""
    return submission.with_name(f"{submission.stem}_exams.csv")


def _predict(args: argparse.Namespace) -> int:
    import statistics
    import time

    from ich import evaluate

    if args.repeat < 1 or (args.repeat > 1 and not args.timings):
        raise SystemExit(f"--repeat {args.repeat}: give a count of 1 or more, with --timings (it only times)")
    start = time.perf_counter()
    predictor = _predictor(args)
    load_s = time.perf_counter() - start
    result = _score(predictor, args.paths, args.quiet, args.every_series)
    if result is None:
        return EXIT_NOTHING_USABLE
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    evaluate.submission(result.frame).to_csv(out, index=False)
    exams = exams_path(out)
    result.exams.to_csv(exams, index=False)
    print(
        f"wrote {len(result.frame)} slices x 6 classes to {out} and {len(result.exams)} "
        f"{'series' if args.every_series else 'exams'} to {exams} ({predictor.name} on {predictor.device}, "
        f"{predictor.engine.name})",
        file=sys.stderr,
    )
    if args.timings:
        timings = {"load_s": load_s, **result.timings}
        # Later calls find the model resident and warm (cuDNN plans, thread pools): a listener's steady state.
        warm = [
            evaluate.predict(predictor, args.paths, progress=False, every_series=args.every_series).timings
            for _ in range(args.repeat - 1)
        ]
        if warm:
            timings |= {f"warm_{k}": statistics.median(t[k] for t in warm) for k in warm[0]}
            timings["warm_calls"] = len(warm)
        print(json.dumps({k: round(v, 4) for k, v in timings.items()}))
    return EXIT_OK


def _evaluate(args: argparse.Namespace) -> int:
    from ich import evaluate

    labels = evaluate.load_labels(args.data, args.labels)
    predictor = _predictor(args)
    result = evaluate.score_folder(predictor, args.data, progress=not args.quiet, every_series=args.every_series)
    for p in result.problems:
        print(f"skipped {p}", file=sys.stderr)
    if result.frame.empty:
        print("no readable slice found", file=sys.stderr)
        return EXIT_NOTHING_USABLE
    report = evaluate.evaluate(result.frame, labels, predictor.thresholds, predictor.top_k)
    report["weights"] = predictor.name
    report["data"] = str(args.data)
    report["trained_on_this_data"] = evaluate.trained_on(predictor.metadata, args.data)
    if report["trained_on_this_data"]:
        print(f"warning: {predictor.name} was trained on {args.data}: these numbers are not a test", file=sys.stderr)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from ich.checkpoint import json_ready

    (out / "report.json").write_text(json.dumps(json_ready(report), indent=2, allow_nan=False) + "\n")
    markdown = evaluate.report_markdown(report, f"Evaluation of {predictor.name} on {args.data}")
    (out / "report.md").write_text(markdown)
    evaluate.submission(result.frame).to_csv(out / "predictions.csv", index=False)
    result.exams.to_csv(out / "exams.csv", index=False)
    figure = evaluate.reliability_figure(report["reliability"], f"Reliability of {predictor.name} on {args.data}")
    figure.write_html(out / "reliability.html", include_plotlyjs=True)  # embedded: opens offline
    print(markdown)
    print(
        f"wrote {out / 'report.json'}, {out / 'report.md'}, {out / 'predictions.csv'}, {out / 'exams.csv'}, "
        f"{out / 'reliability.html'}",
        file=sys.stderr,
    )
    return EXIT_OK


def _after_scoring(args: argparse.Namespace, worklist, predictor) -> list:
    """What runs after each scored exam (``on_scored``): the webhook, the results back to PACS."""
    from ich import explain
    from ich.listener import SendResults
    from ich.notify import Webhook

    after: list = []
    if args.notify_url:
        after.append(Webhook(args.notify_url, worklist, flagged_only=not args.notify_all))
    if args.send_to:
        heatmap = (lambda hu: explain.grad_cam(predictor, hu, "any")) if "any" in predictor.model_classes else None
        after.append(SendResults(worklist, args.send_to, heatmap, predictor.aggregation, calling_ae=args.ae_title))
    return after


def _log_scoring(args: argparse.Namespace) -> None:
    # INFO at least: an admin running a listener or worker wants its one line per association and per exam.
    logging.getLogger("ich").setLevel(min(logging.getLogger("ich").getEffectiveLevel(), logging.INFO))
    if args.verbose < 2:  # pynetdicom's own lines quote instance UIDs; they are for debugging only
        logging.getLogger("pynetdicom").setLevel(logging.ERROR)


def _listen(args: argparse.Namespace) -> int:
    import signal
    import threading

    from ich.files import data_dir
    from ich.listener import Inbox, Listener
    from ich.worklist import Worklist

    directory = Path(args.data_dir) if args.data_dir else data_dir()
    worklist, inbox = Worklist(directory), Inbox(directory / "inbox", args.quiet_seconds)
    queue = None
    if args.queue:  # only receive and store: `ich worker` processes score, and send the results
        if worklist.path is not None:
            print("error: --queue needs the worklist on PostgreSQL (set ICH_DATABASE_URL)", file=sys.stderr)
            return EXIT_NOTHING_USABLE
        if args.notify_url or args.send_to:
            print("error: with --queue, give --notify-url / --send-to to `ich worker`", file=sys.stderr)
            return EXIT_NOTHING_USABLE
        from ich.jobs import Queue

        queue = Queue(worklist)
        listener = Listener(worklist, None, inbox, ae_title=args.ae_title, allow=_allowed(args), enqueue=queue.defer)
    else:
        predictor = _predictor(args)
        after = _after_scoring(args, worklist, predictor)
        listener = Listener(worklist, predictor, inbox, ae_title=args.ae_title, allow=_allowed(args), on_scored=after)
    listener.ae.maximum_associations = args.max_associations
    _log_scoring(args)
    port = listener.start(args.host, args.port)
    print(
        f"listening as AE {args.ae_title} on {args.host}:{port}, worklist in {directory} (Ctrl-C stops)",
        file=sys.stderr,
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    listener.stop()
    if queue is not None:
        queue.close()
    return EXIT_OK


def _allowed(args: argparse.Namespace) -> list[str]:
    return [a for a in (args.allow or "").split(",") if a]


def _worker(args: argparse.Namespace) -> int:
    from ich.files import data_dir
    from ich.jobs import ExamJobs, work
    from ich.worklist import Worklist

    directory = Path(args.data_dir) if args.data_dir else data_dir()
    worklist = Worklist(directory)
    if worklist.path is not None:
        print("error: ich worker needs the worklist on PostgreSQL (set ICH_DATABASE_URL)", file=sys.stderr)
        return EXIT_NOTHING_USABLE
    predictor = _predictor(args)  # loaded once, for every job of this process
    jobs = ExamJobs(worklist, predictor, directory / "inbox", _after_scoring(args, worklist, predictor))
    _log_scoring(args)
    print(
        f"scoring exams queued in {worklist.location}, {args.concurrency} at once, data in {directory} (Ctrl-C stops)",
        file=sys.stderr,
    )
    work(jobs, args.concurrency, args.stalled_after)
    return EXIT_OK


def _worklist(args: argparse.Namespace) -> int:
    from ich.files import data_dir
    from ich.worklist import Worklist

    store = Worklist(Path(args.data_dir) if args.data_dir else data_dir())
    if args.check:
        found = store.check()
        how = "SQLite integrity check" if store.path is not None else "every table and column present"
        print("\n".join(found) if found else f"{store.location}: ok ({how})")
        return EXIT_NOTHING_USABLE if found else EXIT_OK
    frame, pending = store.studies(), store.intake()
    frame = frame.rename(columns={"score": "likelihood", "n_slices": "slices"})
    columns = ["id", "source", "received", "slices", "likelihood", "flagged", "status", "updated"]
    # Exams received but not on the worklist (yet): arriving, or failed with the reason and the next try.
    pending = pending.rename(columns={"state": "status", "first_seen": "received", "key": "exam"})
    pending_columns = ["exam", "source", "received", "status", "study_id", "attempts", "next_try", "reason"]
    if args.json:
        frame[["received", "updated"]] = frame[["received", "updated"]].astype(str).replace("NaT", None)
        rows = json.loads(frame[columns].to_json(orient="records"))
        rows += json.loads(pending[pending_columns].to_json(orient="records"))
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    frame["updated"] = frame["updated"].dt.strftime("%Y-%m-%d %H:%M:%S").fillna("—")  # scored once: no "NaT"
    print(frame[columns].to_string(index=False) if len(frame) else "the worklist is empty")
    if len(pending):
        print("\nreceived, not on the worklist (yet):")
        print(pending[pending_columns].to_string(index=False))
    return EXIT_OK


def _user(args: argparse.Namespace) -> int:
    import getpass

    from ich import access

    path = access.auth_path()
    if args.action == "list":
        config = access.load_config(path)
        users = config["credentials"]["usernames"] if config else {}
        for name in sorted(users):
            print(f"{name}\t{access.role_of(config or {}, name)}")
        print(f"{len(users)} user(s) in {path}" if users else f"no sign-in configured ({path} absent)", file=sys.stderr)
        return EXIT_OK
    if not args.name:
        print("user add needs a NAME", file=sys.stderr)
        return EXIT_NOTHING_USABLE
    password = (
        sys.stdin.readline().rstrip("\n") if args.password_stdin else getpass.getpass(f"password for {args.name}: ")
    )
    try:
        written = access.add_user(args.name, password, args.role, path)
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return EXIT_NOTHING_USABLE
    print(f"{args.name} ({args.role}) written to {written}", file=sys.stderr)
    return EXIT_OK


def _engine_name(value: str) -> str:
    from ich.engine import requested  # here, not at the top: ich.engine imports torch

    try:
        return requested(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--weights", help="checkpoint (.json or .safetensors); default: $ICH_WEIGHTS or the bundled weights/"
    )
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _after_scoring_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--notify-url", help="POST a JSON note (worklist id, flag, likelihood; no identifiers) here")
    parser.add_argument("--notify-all", action="store_true", help="notify every scored study, not only flagged ones")
    parser.add_argument(
        "--send-to", help="AE@host:port: send each scored exam's DICOM SR and key image there (PACS), as --ae-title"
    )


def _every_series_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--every-series",
        action="store_true",
        help="score every series, not only the one per exam the worklist scores (axial, soft tissue, not a "
        "scout or reformat): for labels on series the rule leaves out",
    )


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ich", description="Intracranial hemorrhage triage on head CT (not a medical device)."
    )
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="log progress (-v) or details (-vv) to stderr"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="list the series found in files, folders or zips, and every problem")
    info.add_argument("paths", nargs="+", help="DICOM files, folders (recursive) or .zip archives")
    info.add_argument("--json", action="store_true", help="print one JSON object")
    info.set_defaults(func=_info)

    ph = sub.add_parser("phantom", help="write synthetic head-CT studies in the RSNA layout")
    ph.add_argument("--studies", type=int, default=10)
    ph.add_argument("--seed", type=int, default=0)
    ph.add_argument("--out", required=True)
    ph.add_argument("--thickness", type=float, default=5.0, help="slice thickness and spacing in mm")
    ph.add_argument("--bits", choices=["mixed", "12", "16", "wrapped"], default="mixed", help="pixel storage")
    ph.add_argument("--jpeg", action="store_true", help="write a lossless JPEG transfer syntax")
    ph.add_argument("--masks", action="store_true", help="also write hemorrhage pixel masks")
    ph.set_defaults(func=_phantom)

    pr = sub.add_parser("predict", help="score every slice and write an RSNA submission CSV")
    pr.add_argument("paths", nargs="+", help="DICOM files, folders or .zip archives")
    pr.add_argument(
        "--out",
        required=True,
        help="submission CSV (ID,Label; six rows per slice); the exams go beside it, to <name>_exams.csv",
    )
    _every_series_option(pr)
    pr.add_argument(
        "--timings", action="store_true", help="print load/read/preprocess/infer/total seconds as JSON last"
    )
    pr.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="with --timings: score the input this many times and add the median of the calls after the first (warm_*)",
    )
    pr.add_argument(
        "--engine",
        type=_engine_name,
        help="auto (ONNX Runtime on the CPU when installed, else torch; torch on CUDA), torch or onnxruntime; "
        "default $ICH_ENGINE, else auto",
    )
    _model_options(pr)
    pr.set_defaults(func=_predict)

    ev = sub.add_parser("evaluate", help="predict a labelled dataset and report per-class and series metrics")
    ev.add_argument(
        "data",
        help="labelled folder: RSNA layout (stage_2_train.csv + DICOM), or an image layout (RSNA PNG, with a series.csv "
        "for series; PHE-SICH; boxes); classes the labels leave out are reported as not labelled",
    )
    ev.add_argument("--labels", help="RSNA-format label CSV, if not in DATA")
    ev.add_argument("--out", default="evaluation", help="folder for report.json, report.md, predictions.csv, exams.csv")
    _every_series_option(ev)
    _model_options(ev)
    ev.set_defaults(func=_evaluate)

    from ich.files import DATA_ENV

    ls = sub.add_parser("listen", help="a DICOM Storage SCP: series pushed by PACS are scored onto the worklist")
    ls.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0: every interface)")
    ls.add_argument("--port", type=int, default=11112, help="TCP port (the registered DICOM port is 11112)")
    ls.add_argument("--ae-title", default="ICH", help="this listener's AE title")
    ls.add_argument("--allow", help="comma-separated calling AE titles accepted (default: any)")
    ls.add_argument("--quiet-seconds", type=float, default=10.0, help="a series is scored when quiet this long")
    ls.add_argument("--data-dir", help=f"worklist and inbox folder (default ${DATA_ENV} or .ich-data/)")
    ls.add_argument(
        "--max-associations",
        type=int,
        default=10,
        help="associations accepted at once (pynetdicom's default 10); more are refused, and senders retry",
    )
    ls.add_argument(
        "--queue",
        action="store_true",
        help="only receive and store: queue each exam in the PostgreSQL database (ICH_DATABASE_URL) for `ich worker`",
    )
    _after_scoring_options(ls)
    _model_options(ls)
    ls.set_defaults(func=_listen)

    wk = sub.add_parser("worker", help="score the exams `ich listen --queue` queued (PostgreSQL); run any number")
    wk.add_argument("--concurrency", type=int, default=1, help="exams scored at once by this process")
    wk.add_argument("--data-dir", help=f"the data directory the listener writes (default ${DATA_ENV} or .ich-data/)")
    wk.add_argument("--ae-title", default="ICH", help="the AE title results are sent to PACS as")
    wk.add_argument(
        "--stalled-after",
        type=float,
        default=30.0,
        help="seconds without a heartbeat after which a worker is taken for dead and its exam scored by another",
    )
    _after_scoring_options(wk)
    _model_options(wk)
    wk.set_defaults(func=_worker)

    us = sub.add_parser("user", help="dashboard sign-in: add a user (reader or admin) or list them")
    us.add_argument("action", choices=("add", "list"))
    us.add_argument("name", nargs="?")
    us.add_argument("--role", choices=("reader", "admin"), default="reader")
    us.add_argument("--password-stdin", action="store_true", help="read the password from standard input (scripts)")
    us.set_defaults(func=_user)

    wl = sub.add_parser("worklist", help="print the worklist of a data directory (no patient identifiers)")
    wl.add_argument("--data-dir", help=f"default ${DATA_ENV} or .ich-data/")
    wl.add_argument("--json", action="store_true", help="one JSON array")
    wl.add_argument(
        "--check",
        action="store_true",
        help="check the worklist database (SQLite: its integrity check; PostgreSQL: its tables)",
    )
    wl.set_defaults(func=_worklist)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = get_parser().parse_args(argv)
    level = {0: logging.WARNING, 1: logging.INFO}.get(args.verbose, logging.DEBUG)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    from ich import dicom

    dicom.quiet_invalid_values()  # an entry point: RSNA's invalid UIDs are expected, not news
    try:
        return args.func(args)
    except Exception as exc:
        from ich.worklist import StoreError  # imported here: most commands never open the worklist

        if not isinstance(exc, StoreError):
            raise
        print(f"error: {exc}", file=sys.stderr)  # names the database and what to do; a traceback would not help
        return EXIT_NOTHING_USABLE
