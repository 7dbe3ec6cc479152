"""The slice viewer as a Streamlit component: NiiVue in the browser, fed by files this server hands out.

The study goes to the browser once, as a ``.nii.gz`` file fetched from this server; scrolling, window
and level, zoom, pan, reformats and the HU probe then run in the browser. Only the slice a reader
settles on comes back to Python (after a short pause), so the probabilities and the read form follow.

Files are served by a second, never-drawn component whose folder is a private temporary directory:
Streamlit serves a component's folder as static files, which is the one public way to hand a browser
a large file without passing it through every rerun. Names are keyed hashes, unguessable without
this process's random key, carry no identifier, and vanish with the process.
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import streamlit.components.v1 as components

from ich.files import atomic_write

__all__ = ["publish", "slice_viewer"]

FRONTEND = Path(__file__).with_name("frontend")
KEEP_FILES = 12  # the most recent published files kept; a few studies with their heatmaps


@functools.cache
def _viewer() -> Any:
    return components.declare_component("slice_viewer", path=str(FRONTEND))


@functools.cache
def _shelf() -> tuple[Path, str, bytes]:
    """(folder, its URL relative to the viewer's page, the naming key), made once per process."""
    folder = Path(tempfile.mkdtemp(prefix="ich-viewer-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    served = components.declare_component("viewer_files", path=str(folder))
    return folder, f"../{served.name}", os.urandom(32)


def publish(key: str, make: Callable[[], bytes], suffix: str = ".nii.gz") -> str:
    """Serve ``make()`` under a keyed-hash name for ``key`` and return its URL for the viewer.

    ``make`` runs only when the file is not there (first use, or pruned since): call this on every
    rerun, not from inside a cache, so a URL handed to the browser always names a file that exists.
    """
    folder, url, secret = _shelf()
    name = hashlib.sha256(secret + key.encode()).hexdigest()[:40] + suffix
    path = folder / name
    try:
        os.utime(path)  # recently used: pruned last
    except FileNotFoundError:  # new, or pruned since: (re)build it
        data = make()
        atomic_write(path, lambda tmp: tmp.write_bytes(data))  # every session shares the folder
        for old in sorted(folder.glob(f"*{suffix}"), key=lambda p: p.stat().st_mtime)[:-KEEP_FILES]:
            old.unlink(missing_ok=True)
    return f"{url}/{name}"


def slice_viewer(
    volume_url: str,
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
    positions_known: bool = True,
    heatmap_url: str | None = None,
    heatmap_label: str = "",
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
    """
    if len(locations) != n_slices or len(slice_notes) != n_slices:
        raise ValueError(f"{len(locations)} locations and {len(slice_notes)} notes for {n_slices} slices")
    name, level, width = window
    return _viewer()(
        volume=volume_url,
        n=n_slices,
        normal=[float(v) for v in normal],
        locations=[float(v) for v in locations],
        positions=[round(float(v), 1) if positions_known else None for v in locations],
        goto=goto,
        goto_nonce=goto_nonce,
        window={"name": name, "level": level, "width": width},
        presets={k: {"level": lv, "width": wd} for k, (lv, wd) in presets.items()},
        notes=list(slice_notes),
        thickness=thickness,
        heatmap=heatmap_url,
        heatmap_label=heatmap_label,
        height=height,
        key=key,
        default=None,
    )
