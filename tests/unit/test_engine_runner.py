"""EngineRunner's calls between engine steps, on a scripted engine (the real engine's runner is tested through the
worker, tests/integration/test_mesh_e2e.py)."""

from __future__ import annotations

import asyncio
import threading

from moemesh.services.core.errors import Unavailable
from moemesh.worker.server.runner import EngineRunner


class ScriptedEngine:
    """`steps_left` steps of work; every step and call is written to `log`, in the order they ran."""

    def __init__(self, log: list[str]) -> None:
        self.log, self.steps_left = log, 0
        self.num_running = self.num_waiting = 0
        self.release = threading.Event()  # the first step waits for it: calls queue up meanwhile

    def has_work(self) -> bool:
        return self.steps_left > 0

    def step(self) -> list:
        self.release.wait(10)
        self.steps_left -= 1
        self.log.append("step")
        return []

    def abort(self, request_id: str, reason: str) -> None:
        pass


def test_one_call_runs_between_two_steps_while_the_engine_has_work():
    async def scenario() -> list[str]:
        log: list[str] = []
        engine = ScriptedEngine(log)
        runner = EngineRunner(lambda: engine)
        runner.start()
        engine.steps_left = 3
        runner.abort("none")  # any message: the engine thread wakes and steps (the first step waits for `release`)
        await asyncio.sleep(0.05)
        calls = [runner.call(log.append, f"call {i}") for i in range(5)]  # queued while the first step runs
        engine.release.set()
        await asyncio.gather(*calls)
        await runner.stop()
        return log

    log = asyncio.run(scenario())
    assert log == ["step", "call 0", "step", "call 1", "step", "call 2", "call 3", "call 4"], log


def test_calls_run_back_to_back_on_an_idle_engine_and_fail_once_it_failed():
    async def scenario() -> tuple[list[str], BaseException | None]:
        log: list[str] = []
        engine = ScriptedEngine(log)
        engine.release.set()
        runner = EngineRunner(lambda: engine)
        runner.start()
        results = await asyncio.gather(*[runner.call(lambda i=i: log.append(f"call {i}") or i) for i in range(3)])
        assert results == [0, 1, 2]
        runner.fail(RuntimeError("a shard was lost"))
        await asyncio.wait_for(runner.failed.wait(), 10)
        try:
            await runner.call(log.append, "after")
        except Unavailable as exc:
            return log, exc
        return log, None

    log, error = asyncio.run(scenario())
    assert log == ["call 0", "call 1", "call 2"]
    assert isinstance(error, Unavailable)


def test_a_call_that_raises_hands_its_error_to_the_caller_only():
    async def scenario() -> list:
        log: list[str] = []
        engine = ScriptedEngine(log)
        engine.release.set()
        runner = EngineRunner(lambda: engine)
        runner.start()
        outcomes = await asyncio.gather(runner.call(lambda: 1 / 0), runner.call(lambda: "fine"),
                                        return_exceptions=True)
        await runner.stop()
        return outcomes

    broken, fine = asyncio.run(scenario())
    assert isinstance(broken, ZeroDivisionError) and fine == "fine"
