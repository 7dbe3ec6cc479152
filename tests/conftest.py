from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.uid import ComprehensiveSRStorage, SecondaryCaptureImageStorage
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt

from tests import postgres
from tests.helpers import SHARED_DATA, make_checkpoint

# Tests score with PyTorch, the reference engine: the product's default on a CPU (ONNX Runtime) exports each
# checkpoint once (seconds, and a graph per test checkpoint on disk). tests/test_engine.py checks ONNX Runtime
# against it; subprocesses (the CLI, the dashboard) inherit this.
os.environ.setdefault("ICH_ENGINE", "torch")
# A worklist database named in the caller's environment is never touched: PostgreSQL tests start a server of their own.
os.environ.pop("ICH_DATABASE_URL", None)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real scans beside the checkout (../shared/data); absent in a user's fresh clone."""
    if not (SHARED_DATA / "README.md").exists():
        pytest.skip(
            f"real head-CT data not found at {SHARED_DATA} (present beside the project in CI/dev; elsewhere set "
            "ICH_SHARED_DATA to its data folder)"
        )
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("weights") / "tiny")


@pytest.fixture
def pacs():
    """A second Storage SCP standing in for PACS: keeps every object it receives."""
    received: list = []

    def keep(event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        received.append(ds)
        return 0

    ae = AE(ae_title="PACS")
    for sop_class in (ComprehensiveSRStorage, SecondaryCaptureImageStorage):
        ae.add_supported_context(sop_class, ALL_TRANSFER_SYNTAXES)
    server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, keep)])
    yield f"PACS@127.0.0.1:{server.server_address[1]}", received
    server.shutdown()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[postgres.Server]:
    """A throw-away PostgreSQL server (tests/postgres.py), started once for the session by the first test that asks."""
    try:
        server = postgres.start()
    except postgres.Unavailable as exc:
        pytest.skip(f"no PostgreSQL server for the tests: {exc}")
    yield server
    server.stop()


@pytest.fixture
def postgres_url(postgres_server: postgres.Server) -> Iterator[str]:
    """The URL of a new empty database on the test server, dropped after the test."""
    name = postgres_server.create_database()
    yield postgres_server.url(name)
    postgres_server.drop_database(name)


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str | None:
    """Run the test on each engine: SQLite in the data directory (``None``), or a new PostgreSQL database whose URL
    is set as ICH_DATABASE_URL, so every Worklist the test opens (and every process it starts) uses it."""
    if request.param == "sqlite":
        return None
    url = request.getfixturevalue("postgres_url")
    monkeypatch.setenv("ICH_DATABASE_URL", url)
    return url
