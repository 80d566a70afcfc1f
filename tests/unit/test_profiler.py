"""The live profile: what ran on the loop thread while it sampled, one profile at a time."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from appliance.observe.profiler import LoopProfiler, ProfileRunning, render


def spin_in_the_loop(seconds: float) -> int:
    """Busy work on the loop thread, as a request's own code would be."""
    end = time.perf_counter() + seconds
    n = 0
    while time.perf_counter() < end:
        n += 1
    return n


async def other_task() -> None:
    spin_in_the_loop(0.05)


def test_the_profile_holds_what_other_tasks_ran_and_only_one_runs_at_a_time() -> None:
    async def main() -> tuple[str, str]:
        async def while_sampling(_seconds: float) -> None:
            with pytest.raises(ProfileRunning):
                await profiler.sample(1)
            await asyncio.gather(other_task(), other_task())  # other tasks on the same loop

        profiler = LoopProfiler(sleep=while_sampling)
        session = await profiler.sample(1)
        assert not profiler.running
        return render(session, "text"), render(session, "speedscope")

    text, speedscope = asyncio.run(main())
    assert "spin_in_the_loop" in text and "other_task" in text
    assert "tests/unit/test_profiler.py" in text
    names = {frame["name"] for frame in json.loads(speedscope)["shared"]["frames"]}
    assert {"spin_in_the_loop", "other_task"} <= names


def test_a_cancelled_profile_unhooks_the_thread_and_frees_the_worker() -> None:
    async def main() -> None:
        async def forever(_seconds: float) -> None:
            await asyncio.Event().wait()

        profiler = LoopProfiler(sleep=forever)
        task = asyncio.create_task(profiler.sample(60))
        await asyncio.sleep(0)
        assert profiler.running
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not profiler.running
        profiler_again = LoopProfiler(sleep=lambda _s: asyncio.sleep(0))
        await profiler_again.sample(1)  # the thread is free to be sampled again

    asyncio.run(main())
