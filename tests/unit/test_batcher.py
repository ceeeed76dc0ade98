"""The replica's batcher (no Ray): rows queued while a batch runs go together next, a lone row waits
`max_wait_s` for company and no longer, the size budget holds, a cancelled row never runs, and a
failing batch fails its own callers only."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from softprompt.serve.batcher import Batcher


class _Model:
    """Answers each item with itself; records every batch; can be held mid-batch or made to fail."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.release = threading.Event()
        self.release.set()

    def run(self, items: list[int]) -> list[int]:
        self.batches.append(list(items))
        self.release.wait(10)
        if -1 in items:
            raise ValueError("bad batch")
        return [i * 10 for i in items]


def test_rows_queued_during_a_batch_go_together_next_without_waiting() -> None:
    model = _Model()
    batcher: Batcher[int, int] = Batcher(model.run, len, max_size=8, max_wait_s=0.2)

    async def scenario() -> tuple[list[int], float]:
        model.release.clear()
        first = asyncio.ensure_future(batcher.submit(0))
        await asyncio.sleep(0.3)  # the lone row waited 0.2 s for company, then went alone; it is running now
        rest = [asyncio.ensure_future(batcher.submit(i)) for i in range(1, 12)]
        await asyncio.sleep(0.05)
        started = time.monotonic()
        model.release.set()
        answers = await asyncio.gather(first, *rest)
        return list(answers), time.monotonic() - started

    answers, took = asyncio.run(scenario())
    assert answers == [i * 10 for i in range(12)]
    assert model.batches == [[0], list(range(1, 9)), list(range(9, 12))]  # full batches in arrival order, the budget held
    assert took < 0.15  # the queued rows did not wait max_wait_s again


def test_a_cancelled_row_never_runs_and_a_failing_batch_fails_only_its_callers() -> None:
    model = _Model()
    batcher: Batcher[int, int] = Batcher(model.run, len, max_size=4, max_wait_s=0.05)

    async def scenario() -> tuple[int, int]:
        model.release.clear()
        running = asyncio.ensure_future(batcher.submit(1))
        await asyncio.sleep(0.1)
        gone = asyncio.ensure_future(batcher.submit(2))
        bad = asyncio.ensure_future(batcher.submit(-1))
        await asyncio.sleep(0.01)
        gone.cancel()  # the client left while its row was queued
        model.release.set()
        with pytest.raises(ValueError, match="bad batch"):
            await bad
        return await running, await batcher.submit(3)

    assert asyncio.run(scenario()) == (10, 30)
    assert model.batches == [[1], [-1], [3]]
