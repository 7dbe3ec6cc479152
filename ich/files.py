"""Where the project keeps its files, and the one way it writes them.

- :func:`data_dir`: worklist, caches and training runs (``$ICH_DATA_DIR``, else ``.ich-data/`` in a
  source checkout, else the user's data folder for an installed package).
- :func:`default_weights`: the checkpoint to load (``$ICH_WEIGHTS``, else the one in ``weights/``).
- :func:`atomic_write`: write beside the target, then rename, so a crash or a concurrent reader
  never sees half a file.
- :func:`private_dir`, :func:`check_permissions`: the data directory holds patient data, so what this
  project creates there is for the server's account only (folders 700, files 600), and a looser one
  found at start is logged.
"""

from __future__ import annotations

import functools
import logging
import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = [
    "DATA_ENV",
    "WEIGHTS_ENV",
    "atomic_write",
    "check_permissions",
    "data_dir",
    "default_weights",
    "private_dir",
    "source_root",
    "warn_permissions",
]

DATA_ENV = "ICH_DATA_DIR"
WEIGHTS_ENV = "ICH_WEIGHTS"
_ROOT = Path(__file__).resolve().parents[1]
PRIVATE_UMASK = 0o077  # no group or other bits on what this process creates: folders 700, files 600
log = logging.getLogger(__name__)


def source_root() -> Path | None:
    """The repository checkout this package runs from, or ``None`` when it is installed elsewhere."""
    return _ROOT if (_ROOT / "pyproject.toml").is_file() and (_ROOT / "ich").is_dir() else None


def data_dir() -> Path:
    """``$ICH_DATA_DIR``; else ``.ich-data/`` of the source checkout (git-ignored); else ``~/.local/share/ich``."""
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env)
    root = source_root()
    if root is not None:
        return root / ".ich-data"
    return Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "ich"


def default_weights() -> Path:
    """``$ICH_WEIGHTS``, else the checkpoint bundled in the checkout's ``weights/``.

    Raises :class:`FileNotFoundError` naming both ways out when neither exists (an installed
    package carries no weights: they are built by ``python -m train.bundle``).
    """
    env = os.environ.get(WEIGHTS_ENV)
    if env:
        return Path(env)
    root = source_root()
    folder = root / "weights" if root is not None else None
    # A checkpoint is a .json beside its .safetensors (weights/ also holds evaluation.json).
    found = sorted(p for p in folder.glob("*.json") if p.with_suffix(".safetensors").is_file()) if folder else []
    if not found:
        where = f"in {folder}" if folder else "bundled with an installed package"
        raise FileNotFoundError(f"no checkpoint {where}; pass --weights or set {WEIGHTS_ENV}")
    return found[0]


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` on a temporary path beside ``path``, then rename it to ``path``.

    The rename is atomic on one file system, so readers see the old file or the new one, and an
    interrupted write leaves no partial file behind (the temporary one is removed).
    """
    target = Path(path)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def private_dir(path: str | os.PathLike) -> Path:
    """``path`` (and missing parents) created for this account only.

    Sets this process's umask to 077 first, so whatever it creates from then on (SQLite databases with
    their -wal/-shm, volumes, header copies, inbox files, results, the audit log) is owner-only too,
    without each writer having to remember. An existing folder keeps its mode: :func:`check_permissions`.
    """
    os.umask(PRIVATE_UMASK)
    target = Path(path)
    target.mkdir(parents=True, exist_ok=True)
    return target


def check_permissions(directory: str | os.PathLike) -> list[str]:
    """One line for the data directory and for each entry at its top that other accounts may open.

    Deeper entries are not visited: a private folder guards what it holds. Names at the top are this
    project's own (exams are stored under numbers and hashes), so no line names a patient.
    """
    root = Path(directory)
    if not root.is_dir():
        return []
    problems = []
    for path in [root, *sorted(root.iterdir())]:
        try:
            mode = stat.S_IMODE(path.stat().st_mode)
        except OSError:  # removed meanwhile, or a dangling link: nothing to open
            continue
        if mode & PRIVATE_UMASK:
            problems.append(
                f"{path} has mode {mode:04o}: other accounts on this machine may open it "
                f"(chmod -R go= {root} makes the data directory private)"
            )
    return problems


@functools.cache  # once per directory and process: the dashboard reruns its script on every click
def warn_permissions(directory: Path) -> None:
    """Log :func:`check_permissions` (the dashboard and the DICOM listener at start)."""
    for problem in check_permissions(directory):
        log.warning(problem)
