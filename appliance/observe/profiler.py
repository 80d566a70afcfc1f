"""A live CPU profile of one worker: its event loop thread, sampled for a few seconds with pyinstrument.

pyinstrument samples the thread it is started on. Started from a request handler, that is the worker's
event loop thread, where all of the worker's requests run; with ``async_mode="disabled"`` it records
whatever runs there, not only the handler's own task (which just sleeps). Nothing is sampled while no
profile runs. pyinstrument is imported when the first profile is asked for: a start does not pay for it.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from typing import Any

MAX_SECONDS = 60
DEFAULT_SECONDS = 10
FORMATS = {"text": "text/plain; charset=utf-8", "speedscope": "application/json"}
_INTERVAL_S = 0.001
# The appliance's own frames stay visible wherever it is installed (a venv, or the one-file bundle, where
# pyinstrument takes everything under sys.prefix for library code and folds it away).
_OWN_CODE = r"(.*[/\\])?appliance[/\\]"


class ProfileRunning(Exception):
    """This worker is already being profiled."""


class LoopProfiler:
    """One profile at a time per worker: a second one would sample the same thread twice over."""

    def __init__(self, sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep) -> None:
        self._sleep = sleep
        self.running = False

    async def sample(self, seconds: float) -> Any:
        """Sample this thread for ``seconds`` (the caller awaits them); returns pyinstrument's Session."""
        if self.running:
            raise ProfileRunning
        from pyinstrument import Profiler

        self.running = True
        profiler = Profiler(interval=_INTERVAL_S, async_mode="disabled")
        profiler.start(target_description=f"appliance worker pid {os.getpid()}, event loop thread, {seconds:g} s")
        try:
            await self._sleep(seconds)
        finally:  # also when the client leaves early: the thread must not stay hooked
            session = profiler.stop()
            self.running = False
        return session


def render(session: Any, fmt: str) -> str:
    """The session as text (a call tree, the slowest first) or as speedscope's JSON (speedscope.app)."""
    from pyinstrument.renderers import ConsoleRenderer, SpeedscopeRenderer

    if fmt == "speedscope":  # a timeline to zoom into: every sample, not only frames over 1 % of the time
        return SpeedscopeRenderer(processor_options={"filter_threshold": 0}).render(session)
    return ConsoleRenderer(unicode=True, color=False, processor_options={"show_regex": _OWN_CODE}).render(session)
