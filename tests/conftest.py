from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydicom.uid import ComprehensiveSRStorage, SecondaryCaptureImageStorage
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt

from tests.helpers import SHARED_DATA, make_checkpoint

# Tests score with PyTorch, the reference engine: the product's default on a CPU (ONNX Runtime) exports each
# checkpoint once (seconds, and a graph per test checkpoint on disk). tests/test_engine.py checks ONNX Runtime
# against it; subprocesses (the CLI, the dashboard) inherit this.
os.environ.setdefault("ICH_ENGINE", "torch")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real scans beside the checkout (../shared/data); absent in a user's fresh clone."""
    if not (SHARED_DATA / "README.md").exists():
        pytest.skip(f"real head-CT data not found at {SHARED_DATA} (only present beside the project in CI/dev)")
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
