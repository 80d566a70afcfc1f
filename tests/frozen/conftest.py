"""Frozen-only fixtures: the built binary, a private TMPDIR per start, and process-tree helpers.

The suite runs against the one-file binary named by APPLIANCE_BIN (build it with ``bash build/build.sh``):

    APPLIANCE_BIN=$PWD/dist/appliance pytest tests/frozen -q -m "not llamacpp"

Without APPLIANCE_BIN the tests are skipped; the same behaviours run from source in tests/e2e.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.support.appliance import Appliance


@pytest.fixture(scope="session")
def binary() -> Path:
    """The one-file binary under test; a wrong APPLIANCE_BIN fails loudly instead of skipping."""
    path = Path(os.environ["APPLIANCE_BIN"])
    assert path.is_file() and os.access(path, os.X_OK), f"APPLIANCE_BIN={path} is not an executable file"
    return path


@pytest.fixture
def private_tmp(tmp_path: Path) -> Path:
    """A fresh, empty TMPDIR for the binary, so its _MEI* and pymp-* directories can be counted exactly."""
    folder = tmp_path / "tmpdir"
    folder.mkdir()
    return folder


@pytest.fixture
def start_frozen(start_appliance: Callable[..., Appliance], private_tmp: Path,
                 binary: Path) -> Callable[..., Appliance]:
    """start_appliance with the binary's TMPDIR pointed at ``private_tmp``."""

    def start(config: dict[str, Any], **kwargs: Any) -> Appliance:
        env = {"TMPDIR": str(private_tmp), **kwargs.pop("env", {})}
        return start_appliance(config, env=env, **kwargs)

    return start

