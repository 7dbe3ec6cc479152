"""Webhook notification when a flagged study lands: a JSON POST with no patient identifier.

The payload names the worklist entry (its id in this server's worklist), the flag, the likelihood
and the model; whoever receives it looks the study up on the dashboard. A receiver that is down
or slow costs a logged warning, never the study.
"""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.parse
import urllib.request

from ich.worklist import StudyRecord, Worklist

__all__ = ["Webhook", "payload", "post_json"]

log = logging.getLogger(__name__)
TIMEOUT_SECONDS = 5.0


def payload(study: StudyRecord) -> dict:
    """What a webhook receives about one worklist entry: no UID, name or patient ID."""
    return {
        "event": "study_scored",
        "worklist_id": study.id,
        "flagged": study.flagged,
        "likelihood": study.score,
        "top_subtype": study.top_subtype,
        "slices": study.n_slices,
        "model": study.model,
        "received": study.received,
    }


def post_json(url: str, body: dict, timeout: float = TIMEOUT_SECONDS) -> bool:
    """POST ``body`` as JSON; ``False`` (and a warning in the log) when the receiver does not take it."""
    _check_url(url)
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            ok = 200 <= response.status < 300
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        log.warning("webhook for worklist id %s not delivered: %s", body.get("worklist_id"), exc)
        return False
    if not ok:
        log.warning("webhook for worklist id %s answered %d", body.get("worklist_id"), response.status)
    return ok


def _check_url(url: str) -> None:
    if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        raise ValueError(f"webhook URL must be http:// or https://, got {url!r}")


class Webhook:
    """``on_scored`` callback of :class:`ich.listener.Listener`: POST each flagged study (or every one)."""

    def __init__(self, url: str, worklist: Worklist, flagged_only: bool = True) -> None:
        _check_url(url)
        self.url, self.worklist, self.flagged_only = url, worklist, flagged_only

    def __call__(self, study_id: int) -> bool | None:
        study = self.worklist.study(study_id)
        if self.flagged_only and not study.flagged:
            return None
        return post_json(self.url, payload(study))
