"""The slice viewer and a download button as Streamlit components: study data only over the session.

Streamlit serves ``/media`` files (``st.image``, ``st.download_button``) and a component's folder to any
client that asks, signed in or not (issue 21; ``docs/ARCHITECTURE.md``). So study data never goes there:
the viewer gets its volume and heatmap as ``bytes`` arguments, which travel in the signed-in session's
websocket messages, and opens them in the browser as ``blob:`` URLs; the viewer reports which volume it
holds, so later reruns leave the bytes out. A file download is built in the page from bytes the same way
(:func:`download_button`). The components' own folders hold code only.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import streamlit as st
import streamlit.components.v1 as components

__all__ = ["download_button", "data_id", "slice_viewer"]

FRONTEND = Path(__file__).with_name("frontend")
DOWNLOAD = Path(__file__).with_name("download")


@functools.cache
def _viewer() -> Any:
    return components.declare_component("slice_viewer", path=str(FRONTEND))


@functools.cache
def _download() -> Any:
    return components.declare_component("download_button", path=str(DOWNLOAD))


def data_id(key: str) -> str:
    """A short name for what ``key`` says (e.g. a study's volume version), carrying no identifier."""
    return hashlib.sha256(key.encode()).hexdigest()[:24]


def _held(key: str | None, field: str) -> Any:
    """What the browser said it holds in the component ``key``'s last value (``None`` when unknown)."""
    value = st.session_state.get(key) if key else None
    return value.get(field) if isinstance(value, dict) else None


def download_button(label: str, data: bytes, file_name: str, mime: str, *, key: str) -> bool:
    """A button that saves ``data`` as ``file_name`` from the page itself; ``True`` on the run after a click.

    The bytes reach the page in the session's messages, never as a URL another client could fetch.
    """
    clicked = _download()(label=label, data=data, file_name=file_name, mime=mime, key=key, default=None)
    seen_key = f"{key}-seen"  # the click (its time in the browser) already reported
    new = clicked is not None and clicked != st.session_state.get(seen_key)
    st.session_state[seen_key] = clicked
    return new


def slice_viewer(
    volume_id: str,
    volume: Callable[[], bytes],
    n_slices: int,
    *,
    normal: Sequence[float],
    locations: Sequence[float],
    goto: int,
    goto_nonce: int,
    window: tuple[str, float, float],
    presets: Mapping[str, tuple[float, float]],
    slice_notes: Sequence[str],
    thickness: float | None,
    positions: Sequence[float] | None = None,
    positions_known: bool = True,
    unit: str = "Slice",
    spans: Sequence[tuple[int, int]] | None = None,
    heatmap_id: str | None = None,
    heatmap: Callable[[], bytes] | None = None,
    heatmap_label: str = "",
    preview: Callable[[], bytes] | None = None,
    height: int = 480,
    key: str | None = None,
) -> dict[str, Any] | None:
    """Draw the viewer; returns the reader's last settled slice ``{"slice": 1-based, "seq": n}`` or ``None``.

    ``normal`` and ``locations`` (:func:`ich.viewer.nifti.slice_axis`) let the browser name the slice
    under its crosshair. ``goto`` (1-based) is applied when ``goto_nonce`` changes, so a "Show" button
    moves the viewer without undoing the reader's own scrolling on every rerun. ``window`` is (name,
    level, width), likewise applied when it changes. ``slice_notes[i]`` is the model's one-line
    summary of slice i+1, shown on the image while scrolling, with no round trip to the server.
    ``height`` is the least height in pixels: the browser grows the viewer to the bottom of the screen.
    The planes may be slabs (``unit`` "Slab"): ``spans[k]`` names plane k's first and last slice (1-based),
    and ``positions`` their true centres in mm where they differ from ``locations`` (the NIfTI grid).

    ``volume()`` (``.nii.gz`` bytes, named ``volume_id``) and ``heatmap()`` (likewise, or ``None`` for no
    overlay) are called only while the browser does not hold them yet. ``preview()``: a PNG of the ``goto``
    plane, sent alone in the first render (the volume follows once the browser answers), so the first image
    is on screen while the volume is made, sent and loaded.
    """
    if len(locations) != n_slices or len(slice_notes) != n_slices:
        raise ValueError(f"{len(locations)} locations and {len(slice_notes)} notes for {n_slices} slices")
    name, level, width = window
    held = _held(key, "have") == volume_id
    # Until the browser first answers, only the preview: it is on screen while the volume is made and sent.
    first = key is not None and st.session_state.get(key) is None
    return _viewer()(
        volume_id=volume_id,
        volume=None if held or first else volume(),
        preview=preview() if first and preview is not None else None,
        n=n_slices,
        normal=[float(v) for v in normal],
        locations=[float(v) for v in locations],
        positions=[round(float(v), 1) if positions_known else None for v in (positions or locations)],
        unit=unit,
        spans=[list(span) for span in spans] if spans else None,
        goto=goto,
        goto_nonce=goto_nonce,
        window={"name": name, "level": level, "width": width},
        presets={k: {"level": lv, "width": wd} for k, (lv, wd) in presets.items()},
        notes=list(slice_notes),
        thickness=thickness,
        heatmap_id=heatmap_id,
        heatmap=None if heatmap is None or _held(key, "have_heatmap") == heatmap_id else heatmap(),
        heatmap_label=heatmap_label,
        height=height,
        key=key,
        default=None,
    )
