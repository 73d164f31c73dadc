"""The stream journal: a generation's events in a Redis Stream, with a renewed claim by the process generating it.

`moemesh:journal:<tenant>:<id>` holds the events (one stream entry each,
expiring `ttl` seconds after the last), with tenant and id percent-encoded so
that no two (tenant, id) pairs share a key whatever characters they hold;
`<that key>:owner` is the claim of the process generating it (a random token
per generation). A claim lasts OWNER_TTL seconds and is renewed every
RENEW_EVERY seconds while the generation runs, so a generator that died loses
it within seconds; once the generation is finished the claim lasts as long as
the journal, and a later claim replays the journal instead of generating again.

Readers follow the stream from any index, waiting (XREAD BLOCK) for new
entries until the last one (a finish or an error). A reader whose stream goes
quiet checks the claim: gone (the generator died, or gave up) or replaced (a
retry started the journal afresh) ends it with UNAVAILABLE, so readers of a
dead generator learn it within OWNER_TTL + block_ms. Nothing is ever skipped:
an append that fails stops the generation (cancelling it upstream), records
an UNAVAILABLE error as the last entry where Redis still takes it, and drops
the claim, so every reader ends with a retryable error instead of a gap.

Calls run under the journal's `RedisGuard`: new claims are skipped while
Redis is failing (the caller then serves without a journal), while a journal
already under way keeps trying to write and read it. The journal never holds
more Redis connections than its client's pool allows: at most `max_followers`
blocking reads at once (a follower waits its turn for one), the rest of the
pool kept for the writers' short calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from urllib.parse import quote, unquote

import redis.asyncio as aioredis
from google.rpc import code_pb2

from moemesh.cache.guard import REDIS_UNAVAILABLE, RedisGuard
from moemesh.services.core.errors import InvalidRequest, MeshError, error_from_code
from moemesh.v1 import worker_pb2

log = logging.getLogger(__name__)

EVENT_FIELD = b"e"
OWNER_TTL = 3  # seconds an owner's claim lasts without renewal: a gateway that died loses it (and its readers) quickly
RENEW_EVERY = 1.0  # seconds between renewals: two may fail before the claim lapses
READ_BATCH = 256  # stream entries per XREAD
APPEND_FAILED = "the journal could not record the stream; retry with the same id"


class JournalWriteFailed(Exception):
    """An append to the journal failed: the generation stops rather than leave a gap."""


class Journal:
    """Redis Streams of request events, one stream per (tenant, request id)."""

    def __init__(self, client: aioredis.Redis, ttl: float = 3600.0, block_ms: int = 1000,
                 max_followers: int | None = None) -> None:
        self.client = client
        self.ttl = int(ttl)
        self.block_ms = block_ms
        self.guard = RedisGuard("journal", errors=None, bypasses=None, log_level=logging.WARNING)
        self.breaker = self.guard.breaker
        self._tasks: set[asyncio.Task] = set()
        pool = max(2, client.connection_pool.max_connections)
        self.max_followers = max(1, min(max_followers or pool // 2, pool - 1))
        # Every call holds one of these while it uses a connection, so the pool is never overdrawn and blocking
        # follower reads can never starve the writers' appends.
        self._follower_slots = asyncio.Semaphore(self.max_followers)
        self._writer_slots = asyncio.Semaphore(pool - self.max_followers)

    @staticmethod
    def key(tenant: str, request_id: str) -> str:
        """The stream of one tenant's request id (its claim is this key + ':owner'); both parts are encoded,
        so `:` or `%` in a tenant or id cannot make two pairs meet."""
        return f"moemesh:journal:{quote(tenant, safe='')}:{quote(request_id, safe='')}"

    async def claim(self, key: str, fingerprint: str) -> bool | None:
        """True: this call generates; False: another call did or does (follow the journal); None: no Redis.
        `fingerprint` says what is generated (the same for a retry or a resume of the request): InvalidRequest
        naming `request_id` if the journal holds another request's, which the caller would otherwise be answered
        with."""
        claimed = await self._write(self._claim, key, fingerprint, what="claim", even_if_open=False)
        return None if claimed is REDIS_UNAVAILABLE else claimed

    async def release(self, key: str) -> None:
        """Give up a claim before generating anything (the request was refused): a retry may claim it at once."""
        await self._write(self.client.delete, key + ":owner", what="release")

    def start(self, key: str, events: Callable[[], AsyncIterator[worker_pb2.RequestEvent]]) -> None:
        """Generate in the background, appending every event to the journal."""
        task = asyncio.get_running_loop().create_task(self._record(key, events))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def follow(self, key: str, start: int = 0) -> AsyncIterator[worker_pb2.RequestEvent]:
        """The journal's events from index `start` on, waiting for new ones until the last (finish or error)."""
        last_id, index, claim = "0-0", 0, None
        while True:
            entries, claim = await self._read(key, last_id, claim)
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

    async def _claim(self, key: str, fingerprint: str) -> bool:
        # The claim's value is the request's fingerprint and a token of this claim's own (a reader that sees the
        # value change knows the journal was started afresh); it lasts as long as the journal once finished.
        if not await self.client.set(key + ":owner", f"{fingerprint} {uuid.uuid4().hex}", nx=True, ex=OWNER_TTL):
            held = await self.client.get(key + ":owner")
            if held is not None and b" " in held and held.split(b" ", 1)[0] != fingerprint.encode():
                raise InvalidRequest("request_id", f"{unquote(key.rpartition(':')[2])!r} names another request (a "
                                                   "different model, prompt or sampling) journaled in the last "
                                                   f"{self.ttl} s: reuse an id only to retry or resume the same "
                                                   "request")
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
            async with contextlib.aclosing(events()) as stream:  # leaving early cancels the generation upstream
                async for event in stream:
                    if not await self._append(key, event):
                        raise JournalWriteFailed(key)
        except JournalWriteFailed:
            await self._give_up(key)
            return
        except Exception as exc:  # the error becomes the journal's last event
            code = exc.code if isinstance(exc, MeshError) else code_pb2.INTERNAL
            if not await self._append(key, _error_event(code, str(exc))):
                await self._give_up(key)
                return
        finally:
            renew.cancel()
        # Done: the claim now lasts as long as the journal.
        await self._write(self.client.expire, key + ":owner", self.ttl, what="release")

    async def _give_up(self, key: str) -> None:
        """An append failed: end the readers with a retryable error (as the last entry, where Redis still takes
        one) and drop the claim, so that they stop within one read and a retry generates afresh."""
        log.warning("journal %s: an append failed; the stream ends with UNAVAILABLE", key)
        await self._append(key, _error_event(code_pb2.UNAVAILABLE, APPEND_FAILED))
        await self._write(self.client.delete, key + ":owner", what="give up")

    async def _renew(self, key: str) -> None:
        """Keep the owner's claim alive while it generates (it lapses within OWNER_TTL if this gateway dies)."""
        while True:
            await asyncio.sleep(RENEW_EVERY)
            await self._write(self.client.expire, key + ":owner", OWNER_TTL, what="renew")

    async def _append(self, key: str, event: worker_pb2.RequestEvent) -> bool:
        """Add one event; False when Redis did not take it."""
        pipe = self.client.pipeline(transaction=False)
        pipe.xadd(key, {EVENT_FIELD: event.SerializeToString()})
        pipe.expire(key, self.ttl)
        return await self._write(pipe.execute, what="append") is not REDIS_UNAVAILABLE

    async def _write(self, fn: Callable, *args, what: str, even_if_open: bool = True):
        """A short call of the writer's (claim, append, renew), on a connection reserved for writers."""
        async with self._writer_slots:
            return await self.guard.run(fn, *args, what=what, even_if_open=even_if_open)

    async def _read(self, key: str, last_id: str, claim: bytes | None) -> tuple[list, bytes | None]:
        """The next entries after `last_id`, waiting block_ms at a time while the generator holds its claim; and
        the claim's token. `claim` is the token this reader saw before (None: none yet): a claim gone or
        replaced (a retry started the journal afresh) ends the read with UNAVAILABLE."""
        while True:
            reply = await self._follower_call(self._xread, key, last_id)
            if reply:
                return reply[0][1], claim
            owner = await self._follower_call(self.client.get, key + ":owner")
            if owner is None or (claim is not None and owner != claim):
                # The gateway generating it went away (or gave up): a retry with the same id starts it again.
                raise error_from_code(code_pb2.UNAVAILABLE, "the journaled request lost its generator; retry with the same id")
            claim = owner

    async def _xread(self, key: str, last_id: str) -> list:
        return await self.client.xread({key: last_id}, count=READ_BATCH, block=self.block_ms)

    async def _follower_call(self, fn: Callable, *args):
        """A read for a follower, on one of the followers' connections (waiting its turn for one): attempted even
        while the circuit is open; a failure ends its stream, retryably."""
        async with self._follower_slots:
            result = await self.guard.run(fn, *args, what="read", even_if_open=True)
        if result is REDIS_UNAVAILABLE:
            raise error_from_code(code_pb2.UNAVAILABLE, "the journal is unavailable; retry with the same id")
        return result


def _error_event(code: int, message: str) -> worker_pb2.RequestEvent:
    return worker_pb2.RequestEvent(error=worker_pb2.RequestError(code=code, message=message))
