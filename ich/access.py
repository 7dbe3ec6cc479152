"""Who may use the dashboard: the sign-in file, roles, throttled sign-in, and the append-only audit log.

- Sign-in: ``$ICH_AUTH`` or ``<data dir>/auth.yaml``, the ``credentials`` of the format
  ``streamlit-authenticator`` reads (bcrypt password hashes; a ``cookie`` section is ignored). Users
  are added with ``python -m ich user add NAME --role reader|admin`` (the password is asked, never
  stored in clear). :func:`sign_in` checks a password; a sign-in lasts the browser tab's session (no
  cookie: see docs/ARCHITECTURE.md).
- Throttle: after a few failed sign-ins per user name or per client address, that name or address is
  locked for a while, doubling with each further failure (:class:`Throttle`, shared by every session
  and server process, kept across restarts); while locked no password is checked.
- Roles: ``reader`` views studies and records reads; ``admin`` may also delete studies and turn
  patient identifiers on (shown to signed-in users only; never without sign-in).
- A server that listens beyond this machine must have sign-in (see :func:`refuse_reason`; ``scripts/run``
  asks ``python -m ich.access STREAMLIT_ARGS`` before Streamlit starts).
- Audit: one JSON line per action (who, what, which worklist id, when; the client address on sign-in
  lines) appended to ``<data dir>/audit.log``; never a patient identifier, never a password.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import json
import math
import os
import sqlite3
import sys
import threading
import time
import tomllib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import bcrypt
import yaml

from ich.files import atomic_write, check_permissions, data_dir, private_dir

__all__ = [
    "ACTIONS",
    "AUTH_ENV",
    "ROLES",
    "AuditLog",
    "SignInError",
    "Throttle",
    "User",
    "add_user",
    "auth_path",
    "client_address",
    "is_loopback",
    "load_config",
    "preflight",
    "refuse_reason",
    "role_of",
    "serving_address",
    "sign_in",
]

AUTH_ENV = "ICH_AUTH"
INSECURE_ENV = "ICH_INSECURE"  # set to 1 to serve beyond this machine without sign-in (a trusted lab network)
ROLES = ("reader", "admin")
ACTIONS = (
    "sign-in",
    "sign-in-failed",  # a wrong user name or password
    "sign-in-locked",  # refused while the throttle holds a lock, the password unchecked
    "open",
    "read",
    "export",
    "delete",
    "identifiers-on",
    "identifiers-off",
)
WRONG = "Wrong user name or password."
AUDIT_NAME_CHARS = 64  # what someone typed as a user name is logged, cut to this length

THROTTLE_FILE = "signin.sqlite3"  # in the data directory: shared by every session and server process
USER_FREE_FAILURES = 5  # failed sign-ins for one user name before its first lock
ADDRESS_FREE_FAILURES = 20  # per client address: more, as a reading room may share one (NAT, proxy)
FIRST_LOCK_SECONDS = 30.0  # the first lock; each further failure doubles it ...
MAX_LOCK_SECONDS = 15 * 60.0  # ... up to this
FORGET_SECONDS = 60 * 60.0  # failures this long after the last one no longer count (longer than any lock)
STREAMLIT_CONFIGS = (Path.home() / ".streamlit" / "config.toml", Path(".streamlit") / "config.toml")  # low to high


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
    """Add (or replace) a user with a bcrypt hash of ``password``; creates the file (mode 600)."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    if len(password) < 8:
        raise ValueError("a password needs at least 8 characters")
    path = path or auth_path()
    config = load_config(path) if path.is_file() else None
    config = config or {"credentials": {"usernames": {}}}
    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt()).decode()
    config["credentials"]["usernames"][username] = {"name": username, "password": hashed, "roles": [role]}
    private_dir(path.parent)
    atomic_write(path, lambda tmp: tmp.write_text(yaml.safe_dump(config, sort_keys=True)))
    path.chmod(0o600)  # the hashes: the server's account only
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
    """Append-only JSON lines: ``{"time", "user", "action", "study"}``, plus ``"address"`` (the client's)
    on sign-in lines where it is known; no patient identifier, never a password."""

    _lock = threading.Lock()

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or data_dir() / "audit.log"

    def record(self, user: str, action: str, study: int | None = None, address: str | None = None) -> None:
        if action not in ACTIONS:
            raise ValueError(f"unknown audit action {action!r}")
        now = dt.datetime.now().astimezone().isoformat(timespec="seconds")
        entry = {"time": now, "user": user, "action": action, "study": study}
        if address is not None:
            entry["address"] = address
        private_dir(self.path.parent)
        with self._lock, open(self.path, "a", encoding="utf-8") as fh:  # O_APPEND: whole lines, never rewritten
            fh.write(json.dumps(entry) + "\n")

    def entries(self) -> list[dict]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines() if line]


def lock_seconds(failures: int, free: int) -> float:
    """How long ``failures`` recent failures lock a name or address allowed ``free`` of them."""
    if failures < free:
        return 0.0
    return min(FIRST_LOCK_SECONDS * 2.0 ** min(failures - free, 16), MAX_LOCK_SECONDS)


class Throttle:
    """Failed sign-ins per user name and per client address, in a SQLite file of the data directory.

    Every session and server process shares it, and a restart keeps its locks. Each attempt is counted
    when admitted, before its password is checked (so attempts in parallel sessions cannot slip past a
    lock), and forgiven when the password was right. Past the free failures, a name or address is
    locked from its last failure for :func:`lock_seconds`; a locked attempt is refused uncounted.
    """

    def __init__(self, path: Path | None = None, clock: Callable[[], float] = time.time) -> None:
        self.path, self.clock = path or data_dir() / THROTTLE_FILE, clock

    @staticmethod
    def keys(username: str, address: str | None) -> dict[str, int]:
        """The throttled keys of an attempt and their free failures (no address on loopback or in tests)."""
        keys = {f"user:{username.strip().casefold()}": USER_FREE_FAILURES}
        if address:
            keys[f"address:{address}"] = ADDRESS_FREE_FAILURES
        return keys

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        private_dir(self.path.parent)
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        try:
            db.execute("BEGIN IMMEDIATE")  # one writer at a time across processes: check and count as one
            db.execute("CREATE TABLE IF NOT EXISTS failures (key TEXT PRIMARY KEY, count INTEGER, last REAL)")
            yield db
            db.execute("COMMIT")
        finally:
            db.close()  # without the COMMIT (an error): rolled back

    def admit(self, username: str, address: str | None) -> float | None:
        """Count this attempt and return ``None``; or, while a lock holds, the time to retry at (uncounted)."""
        now, keys = self.clock(), self.keys(username, address)
        with self._transaction() as db:
            db.execute("DELETE FROM failures WHERE last < ?", (now - FORGET_SECONDS,))
            retry = now
            for key, free in keys.items():
                row = db.execute("SELECT count, last FROM failures WHERE key = ?", (key,)).fetchone()
                if row is not None:
                    retry = max(retry, row[1] + lock_seconds(row[0], free))
            if retry > now:
                return retry
            for key in keys:
                db.execute(
                    "INSERT INTO failures VALUES (?, 1, ?) ON CONFLICT (key) DO UPDATE SET count = count + 1, last = ?",
                    (key, now, now),
                )
        return None

    def succeeded(self, username: str, address: str | None) -> None:
        """The admitted attempt was right: the name's failures are forgotten, the address's this one only
        (one right password must not clear the failures others tried from the same address)."""
        user_key, *address_keys = self.keys(username, address)
        with self._transaction() as db:
            db.execute("DELETE FROM failures WHERE key = ?", (user_key,))
            for key in address_keys:
                db.execute("UPDATE failures SET count = count - 1 WHERE key = ?", (key,))


def client_address(value: object) -> str | None:
    """Streamlit's ``st.context.ip_address`` as a canonical IP address, or ``None``: Streamlit gives none
    on loopback, and a stand-in object under ``streamlit.testing``."""
    try:
        return str(ipaddress.ip_address(value))  # type: ignore[arg-type]
    except ValueError:
        return None


class SignInError(Exception):
    """Why a sign-in was refused, in words for the sign-in form."""


def _check_password(config: dict, username: str, password: str) -> str | None:
    """The stored user name when ``password`` is theirs (names match case-insensitively, as
    streamlit-authenticator's did). An unknown name is checked against another user's hash, so the
    time taken does not tell which names exist."""
    users = config["credentials"]["usernames"]
    name = next((u for u in users if u.casefold() == username.strip().casefold()), None)
    right = bcrypt.checkpw(password.encode(), str(users[name or next(iter(users))]["password"]).encode())
    return name if right and name is not None else None


def sign_in(
    config: dict,
    username: str,
    password: str,
    address: str | None,
    throttle: Throttle | None = None,
    audit: AuditLog | None = None,
) -> User:
    """The user whose password this is, audited once; :class:`SignInError` when wrong or while locked.

    A locked name or address is refused before the password is looked at, so the right one does not
    help during a lock. Failures are audited with the name tried and the client address.
    """
    if not username.strip() or not password:
        raise SignInError("Enter a user name and a password.")
    throttle, audit = throttle or Throttle(), audit or AuditLog()
    tried = username.strip()[:AUDIT_NAME_CHARS]
    retry = throttle.admit(username, address)
    if retry is not None:
        audit.record(tried, "sign-in-locked", address=address)
        at = dt.datetime.fromtimestamp(retry).astimezone().strftime("%H:%M:%S")
        wait = math.ceil(retry - throttle.clock())
        raise SignInError(f"Too many failed sign-ins: try again at {at} (in {wait} s). The password was not checked.")
    name = _check_password(config, username, password)
    if name is None:
        audit.record(tried, "sign-in-failed", address=address)
        raise SignInError(WRONG)
    throttle.succeeded(username, address)
    audit.record(name, "sign-in", address=address)
    return User(name, role_of(config, name))


def serving_address(
    args: Sequence[str], env: Mapping[str, str] = os.environ, configs: Sequence[Path] = STREAMLIT_CONFIGS
) -> str:
    """The address ``streamlit run APP ARGS`` listens on, by Streamlit's precedence: ``--server.address``,
    then ``$STREAMLIT_SERVER_ADDRESS``, then the config files (last wins); "" (every interface) if unset."""
    for i, arg in enumerate(args):
        if arg.startswith("--server.address="):
            return arg.partition("=")[2]
        if arg == "--server.address" and i + 1 < len(args):
            return args[i + 1]
    if "STREAMLIT_SERVER_ADDRESS" in env:
        return env["STREAMLIT_SERVER_ADDRESS"]
    address = ""
    for path in configs:
        if path.is_file():
            address = str(tomllib.loads(path.read_text()).get("server", {}).get("address", address))
    return address


def preflight(args: Sequence[str]) -> str | None:
    """Why ``streamlit run APP ARGS`` must not start (see :func:`refuse_reason`), or ``None``."""
    try:
        return refuse_reason(serving_address(args), load_config())
    except (OSError, ValueError, yaml.YAMLError) as exc:  # a broken sign-in or config file: say which
        return str(exc)


if __name__ == "__main__":  # scripts/run, before Streamlit prints a URL: python -m ich.access STREAMLIT_ARGS
    for problem in check_permissions(data_dir()):  # in the terminal at start, not first in a page's log
        print(f"ich: warning: {problem}", file=sys.stderr)
    reason = preflight(sys.argv[1:])
    if reason:
        print(f"ich: not starting. {reason}", file=sys.stderr)
    sys.exit(1 if reason else 0)
