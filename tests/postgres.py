"""A throw-away PostgreSQL server for the tests: Debian's ``postgresql`` binaries, a data directory and a Unix
socket in one temporary folder, no TCP port; stopped and removed at the end of the session.

``initdb`` refuses to run as root, so under root (CI) the server runs as the ``postgres`` account (``nobody``
where there is none), which then owns the folder. Each test gets a database of its own.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg

USER = "ich"  # the superuser initdb creates; trusted on the socket, which only this folder's owner can reach
# Durability is not what these tests check: without fsync a database is created in milliseconds.
SETTINGS = "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200"


class Unavailable(RuntimeError):
    """No PostgreSQL server can be started here; the message says what is missing."""


def bindir() -> Path:
    """The folder holding initdb, pg_ctl and postgres: ``pg_config --bindir``, else the newest Debian install."""
    found = []
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        found.append(
            subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, check=True).stdout.strip()
        )
    found += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name), reverse=True)
    for folder in map(Path, found):
        if all((folder / tool).is_file() for tool in ("initdb", "pg_ctl", "postgres", "pg_isready")):
            return folder
    raise Unavailable(
        "PostgreSQL server binaries (initdb, pg_ctl, postgres) not found via pg_config or /usr/lib/postgresql/*/bin: "
        "install Debian's postgresql package (scripts/test does, as root)"
    )


class Server:
    """A running server; :func:`start` makes one."""

    def __init__(self, tools: Path, root: Path, account: str | None) -> None:
        self.tools, self.root, self.account = tools, root, account
        self.data, self.log = root / "data", root / "server.log"

    def run(self, tool: str, *args: str) -> subprocess.CompletedProcess:
        """A server tool, as the account that owns the server."""
        command = [str(self.tools / tool), *args]
        if self.account is not None:
            command = ["runuser", "-u", self.account, "--", *command]
        return subprocess.run(command, capture_output=True, text=True, timeout=120)

    def url(self, database: str) -> str:
        return f"postgresql://{USER}@/{database}?host={self.root}"

    def _admin(self) -> psycopg.Connection:
        return psycopg.connect(host=str(self.root), user=USER, dbname="postgres", autocommit=True)

    def create_database(self) -> str:
        """A new empty database; its name."""
        name = f"test_{secrets.token_hex(6)}"
        with self._admin() as db:
            db.execute(f"CREATE DATABASE {name}")
        return name

    def drop_database(self, name: str) -> None:
        """Drop it, closing the connections a test's stores still hold in their pools."""
        with self._admin() as db:
            db.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def restart(self) -> None:
        """Stop the server (fast: open connections are cut) and start it again on the same socket and settings."""
        done = self.run("pg_ctl", "restart", "-D", str(self.data), "-l", str(self.log), "-m", "fast", "-w", "-t", "60")
        if done.returncode != 0:
            raise RuntimeError(f"pg_ctl restart failed: {(done.stderr or done.stdout).strip()[-2000:]}")

    def stop(self) -> None:
        self.run("pg_ctl", "stop", "-D", str(self.data), "-m", "fast", "-w")
        shutil.rmtree(self.root, ignore_errors=True)


def start() -> Server:
    """Start a server in a new temporary folder; :class:`Unavailable` says why none could start."""
    tools = bindir()
    account = None
    if os.geteuid() == 0:
        account = next((a for a in ("postgres", "nobody") if _exists(a)), None)
        if account is None or shutil.which("runuser") is None:
            raise Unavailable("running as root, but neither a postgres nor a nobody account (with runuser) to run it")
    # The socket's path must stay under 108 bytes: a short folder in the system's temporary directory.
    root = Path(tempfile.mkdtemp(prefix="ich-pg-"))
    server = Server(tools, root, account)
    if account is not None:
        entry = pwd.getpwnam(account)
        os.chown(root, entry.pw_uid, entry.pw_gid)
    steps = [
        ("initdb", "-D", str(server.data), "-U", USER, "-A", "trust", "-E", "UTF8", "--locale=C", "--no-sync"),
        ("pg_ctl", "start", "-D", str(server.data), "-l", str(server.log), "-w", "-t", "60",
         "-o", f"-k {root} -c listen_addresses='' {SETTINGS}"),
    ]  # fmt: skip
    for tool, *args in steps:
        done = server.run(tool, *args)
        if done.returncode != 0:
            log = server.log.read_text(errors="replace")[-2000:] if server.log.exists() else ""
            shutil.rmtree(root, ignore_errors=True)
            raise Unavailable(
                f"{tool} failed ({done.returncode}): {(done.stderr or done.stdout).strip()[-2000:]} {log}"
            )
    deadline = time.monotonic() + 30
    while server.run("pg_isready", "-h", str(root), "-U", USER).returncode != 0:
        if time.monotonic() > deadline:
            server.stop()
            raise Unavailable(f"the server in {root} did not accept connections within 30 s")
        time.sleep(0.1)
    return server


def _exists(account: str) -> bool:
    try:
        pwd.getpwnam(account)
    except KeyError:
        return False
    return True
