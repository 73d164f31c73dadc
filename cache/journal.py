"""The stream journal: a generation's events in a Redis Stream, with a renewed claim by the process generating it.

`moemesh:journal:<tenant>:<id>` holds the events (one stream entry each,
expiring `ttl` seconds after the last); `<that key>:owner` is the claim of
the process generating it. A claim lasts OWNER_TTL seconds and is renewed
while the generation runs, so a generator that died loses it quickly; once
the generation is finished the claim lasts as long as the journal, and a
later claim replays the journal instead of generating again.

Readers follow the stream from any index, waiting (XREAD BLOCK) for new
entries until the last one (a finish or an error). Calls run under the
journal's `RedisGuard`: new claims are skipped while Redis is failing (the
caller then serves without a journal), while a journal already under way
keeps trying to write and read it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable

import redis.asyncio as aioredis
from google.rpc import code_pb2

from moemesh.cache.guard import REDIS_UNAVAILABLE, RedisGuard
from moemesh.services.core.errors import MeshError, error_from_code
from moemesh.v1 import worker_pb2

EVENT_FIELD = b"e"
OWNER_TTL = 10  # seconds an owner's claim lasts without renewal: a gateway that died loses it quickly
READ_BATCH = 256  # stream entries per XREAD


class Journal:
    """Redis Streams of request events, one stream per (tenant, request id)."""

    def __init__(self, client: aioredis.Redis, ttl: float = 3600.0, block_ms: int = 1000) -> None:
        self.client = client
        self.ttl = int(ttl)
        self.block_ms = block_ms
        self.guard = RedisGuard("journal", errors=None, bypasses=None, log_level=logging.WARNING)
        self.breaker = self.guard.breaker
        self._tasks: set[asyncio.Task] = set()

    @staticmethod
    def key(tenant: str, request_id: str) -> str:
        """The stream of one tenant's request id (its claim is this key + ':owner')."""
        return f"moemesh:journal:{tenant}:{request_id}"

    async def claim(self, key: str) -> bool | None:
        """True: this call generates; False: another call did or does (follow the journal); None: no Redis."""
        claimed = await self.guard.run(self._claim, key, what="claim")
        return None if claimed is REDIS_UNAVAILABLE else claimed

    def start(self, key: str, events: Callable[[], AsyncIterator[worker_pb2.RequestEvent]]) -> None:
        """Generate in the background, appending every event to the journal."""
        task = asyncio.get_running_loop().create_task(self._record(key, events))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def follow(self, key: str, start: int = 0) -> AsyncIterator[worker_pb2.RequestEvent]:
        """The journal's events from index `start` on, waiting for new ones until the last (finish or error)."""
        last_id, index = "0-0", 0
        while True:
            entries = await self._read(key, last_id)
            for entry_id, fields in entries:
                last_id = entry_id
                event = worker_pb2.RequestEvent.FromString(fields[EVENT_FIELD])
                if event.HasField("error"):
                    raise error_from_code(event.error.code, event.error.message, event.error.retry_after_seconds)
                if index >= start:
                    yield event
                index += 1
                if event.finish_reason:
                    return

    async def _claim(self, key: str) -> bool:
        if not await self.client.set(key + ":owner", b"1", nx=True, ex=OWNER_TTL):
            return False
        if await self._finished(key):
            await self.client.expire(key + ":owner", self.ttl)  # finished: nothing to generate, replay it
            return False
        await self.client.delete(key)  # an unfinished journal of a gateway that died: start it afresh
        return True

    async def _finished(self, key: str) -> bool:
        """Whether the journal holds a finished answer."""
        entries = await self.client.xrevrange(key, count=1)
        if not entries:
            return False
        return bool(worker_pb2.RequestEvent.FromString(entries[0][1][EVENT_FIELD]).finish_reason)

    async def _record(self, key: str, events: Callable[[], AsyncIterator[worker_pb2.RequestEvent]]) -> None:
        renew = asyncio.get_running_loop().create_task(self._renew(key))
        try:
            async for event in events():
                await self._append(key, event)
        except Exception as exc:  # the error becomes the journal's last event
            code = exc.code if isinstance(exc, MeshError) else code_pb2.INTERNAL
            await self._append(key, worker_pb2.RequestEvent(error=worker_pb2.RequestError(code=code, message=str(exc))))
        finally:
            renew.cancel()
        # Done: the claim now lasts as long as the journal.
        await self.guard.run(self.client.expire, key + ":owner", self.ttl, what="release", even_if_open=True)

    async def _renew(self, key: str) -> None:
        """Keep the owner's claim alive while it generates (it lapses within OWNER_TTL if this gateway dies)."""
        while True:
            await asyncio.sleep(OWNER_TTL / 3)
            await self.guard.run(self.client.expire, key + ":owner", OWNER_TTL, what="renew", even_if_open=True)

    async def _append(self, key: str, event: worker_pb2.RequestEvent) -> None:
        pipe = self.client.pipeline(transaction=False)
        pipe.xadd(key, {EVENT_FIELD: event.SerializeToString()})
        pipe.expire(key, self.ttl)
        await self.guard.run(pipe.execute, what="append", even_if_open=True)

    async def _read(self, key: str, last_id: str) -> list[tuple[bytes, dict[bytes, bytes]]]:
        """The next entries after `last_id`, waiting block_ms at a time while the generator holds its claim."""
        while True:
            reply = await self._follower_call(self._xread, key, last_id)
            if reply:
                return reply[0][1]
            if not await self._follower_call(self.client.exists, key + ":owner"):
                # The gateway generating it went away: a retry with the same id starts it again.
                raise error_from_code(code_pb2.UNAVAILABLE, "the journaled request lost its generator; retry with the same id")

    async def _xread(self, key: str, last_id: str) -> list:
        return await self.client.xread({key: last_id}, count=READ_BATCH, block=self.block_ms)

    async def _follower_call(self, fn: Callable, *args):
        """A read for a follower: attempted even while the circuit is open; a failure ends its stream, retryably."""
        result = await self.guard.run(fn, *args, what="read", even_if_open=True)
        if result is REDIS_UNAVAILABLE:
            raise error_from_code(code_pb2.UNAVAILABLE, "the journal is unavailable; retry with the same id")
        return result
