"""Every service runs on uvloop unless MOEMESH_EVENT_LOOP asks for asyncio's own loop."""

from __future__ import annotations

import asyncio

import pytest

from moemesh.services.core.entrypoint import EVENT_LOOP_ENV, run_event_loop


def loop_module(monkeypatch, choice: str | None) -> str:
    if choice is None:
        monkeypatch.delenv(EVENT_LOOP_ENV, raising=False)
    else:
        monkeypatch.setenv(EVENT_LOOP_ENV, choice)
    seen = []

    async def main():
        seen.append(type(asyncio.get_running_loop()).__module__)

    run_event_loop(main())
    return seen[0]


def test_services_run_on_uvloop_by_default_and_on_asyncio_when_asked(monkeypatch):
    assert loop_module(monkeypatch, None).startswith("uvloop")
    assert loop_module(monkeypatch, "asyncio").startswith("asyncio")


def test_an_unknown_loop_is_refused_naming_the_variable(monkeypatch):
    monkeypatch.setenv(EVENT_LOOP_ENV, "trio")
    coroutine = asyncio.sleep(0)
    with pytest.raises(SystemExit, match=EVENT_LOOP_ENV):
        run_event_loop(coroutine)
    coroutine.close()
