"""Who may use the dashboard: the sign-in file, roles, and the append-only audit log.

- Sign-in: ``$ICH_AUTH`` or ``<data dir>/auth.yaml``, in the format ``streamlit-authenticator`` reads
  (bcrypt password hashes, a cookie name and secret key). Users are added with
  ``python -m ich user add NAME --role reader|admin`` (the password is asked, never stored in clear).
- Roles: ``reader`` views studies and records reads; ``admin`` may also delete studies and turn
  patient identifiers on (shown to signed-in users only; never without sign-in).
- A server that listens beyond this machine must have sign-in (see :func:`refuse_reason`).
- Audit: one JSON line per action (who, what, which worklist id, when) appended to
  ``<data dir>/audit.log``; never a patient identifier.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import secrets
import threading
from dataclasses import dataclass
from pathlib import Path

import bcrypt
import yaml

from ich.files import atomic_write, data_dir

__all__ = [
    "ACTIONS",
    "AUTH_ENV",
    "ROLES",
    "AuditLog",
    "User",
    "add_user",
    "auth_path",
    "is_loopback",
    "load_config",
    "refuse_reason",
    "role_of",
]

AUTH_ENV = "ICH_AUTH"
INSECURE_ENV = "ICH_INSECURE"  # set to 1 to serve beyond this machine without sign-in (a trusted lab network)
ROLES = ("reader", "admin")
ACTIONS = ("sign-in", "open", "read", "export", "delete", "identifiers-on", "identifiers-off")
COOKIE_DAYS = 1.0  # a reading shift


@dataclass(frozen=True)
class User:
    username: str
    role: str

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


def auth_path() -> Path:
    return Path(os.environ.get(AUTH_ENV) or data_dir() / "auth.yaml")


def load_config(path: Path | None = None) -> dict | None:
    """The sign-in configuration, or ``None`` when there is none (a single-user local server)."""
    path = path or auth_path()
    if not path.is_file():
        return None
    config = yaml.safe_load(path.read_text()) or {}
    if not config.get("credentials", {}).get("usernames"):
        raise ValueError(f"{path}: no users (add one with python -m ich user add NAME)")
    return config


def add_user(username: str, password: str, role: str = "reader", path: Path | None = None) -> Path:
    """Add (or replace) a user with a bcrypt hash of ``password``; creates the file and its cookie key."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    if len(password) < 8:
        raise ValueError("a password needs at least 8 characters")
    path = path or auth_path()
    config = load_config(path) if path.is_file() else None
    config = config or {"credentials": {"usernames": {}}}
    config.setdefault("cookie", {"name": "ich_auth", "key": secrets.token_hex(32), "expiry_days": COOKIE_DAYS})
    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt()).decode()
    config["credentials"]["usernames"][username] = {"name": username, "password": hashed, "roles": [role]}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: tmp.write_text(yaml.safe_dump(config, sort_keys=True)))
    path.chmod(0o600)  # hashes and the cookie key: the server's account only
    return path


def role_of(config: dict, username: str) -> str:
    roles = config["credentials"]["usernames"].get(username, {}).get("roles") or ["reader"]
    return "admin" if "admin" in roles else "reader"


def is_loopback(address: str) -> bool:
    """Only this machine can connect ("" and 0.0.0.0 mean every interface)."""
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def refuse_reason(address: str, config: dict | None) -> str | None:
    """Why this server must not serve (listening beyond this machine without sign-in), or ``None``."""
    if config is not None or is_loopback(address) or os.environ.get(INSECURE_ENV) == "1":
        return None
    return (
        f"This server listens on {address or 'every interface'} without sign-in. Add a user "
        f"(python -m ich user add NAME --role admin), or set {INSECURE_ENV}=1 to accept the risk on a trusted network."
    )


class AuditLog:
    """Append-only JSON lines: ``{"time", "user", "action", "study"}``; no patient identifier."""

    _lock = threading.Lock()

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or data_dir() / "audit.log"

    def record(self, user: str, action: str, study: int | None = None) -> None:
        if action not in ACTIONS:
            raise ValueError(f"unknown audit action {action!r}")
        now = dt.datetime.now().astimezone().isoformat(timespec="seconds")
        line = json.dumps({"time": now, "user": user, "action": action, "study": study})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock, open(self.path, "a", encoding="utf-8") as fh:  # O_APPEND: whole lines, never rewritten
            fh.write(line + "\n")

    def entries(self) -> list[dict]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines() if line]
