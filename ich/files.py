"""Where the project keeps its files, and the one way it writes them.

- :func:`data_dir`: worklist, caches and training runs (``$ICH_DATA_DIR``, else ``.ich-data/`` in a
  source checkout, else the user's data folder for an installed package).
- :func:`default_weights`: the checkpoint to load (``$ICH_WEIGHTS``, else the one in ``weights/``).
- :func:`atomic_write`: write beside the target, then rename, so a crash or a concurrent reader
  never sees half a file.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["DATA_ENV", "WEIGHTS_ENV", "atomic_write", "data_dir", "default_weights", "source_root"]

DATA_ENV = "ICH_DATA_DIR"
WEIGHTS_ENV = "ICH_WEIGHTS"
_ROOT = Path(__file__).resolve().parents[1]


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
