"""ich.notify: the webhook a flagged study triggers, against a real local HTTP server."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from ich.notify import Webhook, post_json
from ich.worklist import Worklist
from tests.helpers import add


@pytest.fixture
def receiver():
    received: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args) -> None:  # keep the test output quiet
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook", received
    server.shutdown()


def test_flagged_study_is_posted_without_identifiers(tmp_path, receiver):
    url, received = receiver
    wl = Worklist(tmp_path)
    flagged, series = add(wl, 0.9)
    clear, _ = add(wl, 0.1)
    hook = Webhook(url, wl)
    assert hook(flagged) is True and hook(clear) is None  # clear studies are not announced
    (body,) = received
    assert body["worklist_id"] == flagged and body["flagged"] and body["likelihood"] == pytest.approx(0.9)
    text = json.dumps(body)
    assert series.study_uid not in text and series.series_uid not in text
    assert not [uid for uid in series.sop_uids if uid in text]
    assert Webhook(url, wl, flagged_only=False)(clear) is True and len(received) == 2


def test_a_receiver_that_is_down_costs_a_warning_only(caplog):
    assert post_json("http://127.0.0.1:9/hook", {"worklist_id": 3}, timeout=2) is False
    assert "worklist id 3 not delivered" in caplog.text


def test_only_http_urls():
    with pytest.raises(ValueError, match="http"):
        post_json("file:///etc/passwd", {})
