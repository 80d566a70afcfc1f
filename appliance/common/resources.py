"""Find static/ and migrations/ in a checkout, an installed wheel or the frozen bundle."""

from __future__ import annotations

import sys
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent.parent  # appliance/


def resource_root() -> Path:
    """The folder holding static/ and migrations/."""
    bundle = getattr(sys, "_MEIPASS", None)
    if bundle:
        return Path(bundle)
    packaged = _PACKAGE / "_data"  # a wheel force-includes both folders here
    if (packaged / "migrations").is_dir():
        return packaged
    return _PACKAGE.parent  # a source checkout or an editable install


def migrations_dir() -> Path:
    return resource_root() / "migrations"


def static_dir() -> Path:
    return resource_root() / "static"
