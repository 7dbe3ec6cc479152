from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import SHARED_DATA, make_checkpoint


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real scans beside the checkout (../shared/data); absent in a user's fresh clone."""
    if not (SHARED_DATA / "README.md").exists():
        pytest.skip(f"real head-CT data not found at {SHARED_DATA} (only present beside the project in CI/dev)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("weights") / "tiny")
