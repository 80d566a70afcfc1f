"""The batch runner's loop while the database server is down: one warning when it goes, one line when it is
back, never a traceback per poll (PostgreSQL; the runner polls every poll_interval_s)."""

from __future__ import annotations

import asyncio
import logging
from types import SimpleNamespace

import pytest

from appliance.batches.runner import BatchRunner
from appliance.common.config import Settings
from appliance.storage.db import DatabaseUnavailable


def test_a_database_outage_is_logged_once_and_its_end_once(caplog: pytest.LogCaptureFixture) -> None:
    settings = Settings.model_validate({"batches": {"poll_interval_s": 0.001}})
    runner = BatchRunner(SimpleNamespace(settings=settings, db=None, state=None), store=None)  # type: ignore[arg-type]
    outcomes = [DatabaseUnavailable("connection refused")] * 5 + [None] * 2 + [DatabaseUnavailable("again")]
    steps: list[object] = []

    async def hold() -> bool:
        return True

    async def step() -> None:
        steps.append(outcomes[len(steps)])
        if len(steps) == len(outcomes):
            runner._stopping = True
        if steps[-1] is not None:
            raise steps[-1]  # type: ignore[misc]

    runner._hold = hold  # type: ignore[method-assign]
    runner.step = step  # type: ignore[method-assign]
    with caplog.at_level(logging.INFO, logger="appliance"):
        asyncio.run(runner._run())
    lines = [(r.levelname, r.getMessage()) for r in caplog.records if r.name.startswith("appliance")]
    assert lines == [("WARNING", "batch runner waits for the database: connection refused"),
                     ("INFO", "batch runner: the database answers again"),
                     ("WARNING", "batch runner waits for the database: again")]
    assert not any(r.exc_info for r in caplog.records)
