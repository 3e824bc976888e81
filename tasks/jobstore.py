"""Job records in Redis: what was asked, per-stem state and progress, callback delivery state.

One hash per job (``stemgen:job:{job_id}``) plus one key per ``generation_request_id`` that makes
submission idempotent (``SET NX``). Both live in the Redis of the Celery result backend and expire
after ``job_ttl_seconds``. New jobs also enter the outbox (``stemgen:outbox``, a sorted set of job
ids scored by when they are next due), from which tasks.dispatcher sends their Celery chords: the
transactional-outbox pattern, so a job is recorded and due for dispatch in one atomic step and the
gateway's request path never talks to the broker.

Every step that must happen once is a Redis state transition, because every Celery task here may run
twice (``acks_late``: a task whose worker died is delivered again):

- ``create``: the job record, its idempotency claim and its outbox entry are written in one script,
  so no claim ever points at a missing record (a claim whose record is gone is replaced) and no
  recorded job misses the outbox;
- ``claim_due``: an outbox entry is leased to one dispatcher at a time (its score moves past the
  lease); a dispatcher that dies leaves it to be claimed again when the lease ends;
- ``mark_dispatched``: the chord was sent; the entry leaves the outbox (checked before sending);
- ``finish``: the first final state and callback body win;
- ``mark_delivery_enqueued``: finalize hands the callback to delivery once;
- ``claim_overdue_deliveries``: a pending delivery whose next attempt is overdue by a grace period
  (its Celery message was lost: celery/celery#4354, a message published while a worker is in warm
  shutdown can vanish with the Redis broker) is leased to one dispatcher, which sends it again;
- ``acquire_delivery_lock``: one delivery attempt at a time, so two copies of the delivery task
  cannot both POST; the delivered state is checked under the lock.

Live progress: every write that changes the state of the job or of a stem (``create``,
``update_stem``, ``finish``) also appends an event to the job's Redis stream
(``stemgen:events:{job_id}``) in the same script, so no state change is recorded without its event
and no event is seen before its state. The stream is capped (``XADD MAXLEN ~ EVENTS_MAXLEN``) and
expires with the job record, or EVENTS_KEEP_AFTER_FINISH_SECONDS after the job's final state when
that is sooner; its entry ids are the events' ids (``Last-Event-ID`` of
``GET /jobs/<id>/events``). ``EventFeed`` reads many streams with one blocking ``XREAD``, so a
gateway process needs one Redis connection for all of its event streams (api.events).

Job list: ``create`` also puts the job in a sorted set scored by creation time, one per API key
(``stemgen:job-index:{owner}``, the key's identifier, never the key), trimmed to the job TTL and
expiring with it; ``list_jobs`` pages through it newest first and drops entries whose record expired.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import re
import secrets
import time
import uuid
import dataclasses
from dataclasses import dataclass

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from tasks import redis_connection

STEM_STATES = ("queued", "running", "completed", "failed", "cancelled")
JOB_STATES = ("queued", "running", "cancelling", "completed", "failed", "partial", "cancelled")
DELIVERY_STATES = ("none", "pending", "delivering", "delivered", "failed")
#: Job states after which nothing changes but the callback's delivery (the event stream ends).
FINAL_JOB_STATES = frozenset({"completed", "failed", "partial", "cancelled"})

#: Most events kept per job stream (approximate trim). A job writes about 2 + 52 per stem (progress
#: is stored at most every 2 %), so a three-stem job fits with room for a redelivered task.
EVENTS_MAXLEN = 1000
#: A finished job's event stream is kept this long (seconds; the record, JOB_TTL_SECONDS): a
#: client that resumes later gets the final state from the record (api.events), and a job's
#: progress history (~20 KB for three stems) need not stay in Redis for the record's week.
EVENTS_KEEP_AFTER_FINISH_SECONDS = 3600
#: Most index entries ``list_jobs`` examines per call (a status filter may match few of them).
LIST_SCAN_MAX = 1000

_PREFIX = "stemgen"

# Lua: append an event to a job's stream (KEYS[2]; the job record is KEYS[1]), capped at ARGV
# maxlen entries; a stream that has no TTL yet (just made) gets the record's remaining lifetime,
# so it expires with the job.
_EMIT = """
local function emit(maxlen, kind, data)
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', maxlen, '*', 'type', kind, 'data', data)
  if redis.call('PTTL', KEYS[2]) == -1 then
    local ttl = redis.call('PTTL', KEYS[1])
    if ttl > 0 then redis.call('PEXPIRE', KEYS[2], ttl) end
  end
end
"""

# Lua: the Redis server's clock in seconds, as ``now`` (outbox scores use the server's clock: no
# skew between the gateway's and the workers' hosts).
_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
"""

# KEYS: request key, new job key, outbox, job's event stream, owner's job index (sorted set).
# ARGV: claim JSON, ttl, job key prefix, job id, events maxlen, "queued" event data, creation time
# (index score), index entries older than this are dropped, then the record's fields. An existing
# claim wins while its record exists; a claim whose record is gone is replaced. A new job is due in
# the outbox at once, has its first event, and enters its owner's index (which lives as long as
# its newest job).
_CREATE = _NOW + """
local claim = redis.call('GET', KEYS[1])
if claim then
  local ok, existing = pcall(cjson.decode, claim)
  if ok and type(existing) == 'table' and existing['job_id']
     and redis.call('EXISTS', ARGV[3] .. existing['job_id']) == 1 then
    return claim
  end
end
redis.call('HSET', KEYS[2], unpack(ARGV, 9))
redis.call('EXPIRE', KEYS[2], ARGV[2])
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
redis.call('ZADD', KEYS[3], now, ARGV[4])
redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[5], '*', 'type', 'job', 'data', ARGV[6])
redis.call('EXPIRE', KEYS[4], ARGV[2])
redis.call('ZADD', KEYS[5], ARGV[7], ARGV[4])
redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', '(' .. ARGV[8])
redis.call('EXPIRE', KEYS[5], ARGV[2])
return false
"""

# KEYS: a schedule (the outbox, the deliveries). ARGV: most entries, lease seconds, grace seconds.
# The entries due at least grace seconds ago (oldest first), each moved to "due again when the
# lease ends".
_CLAIM_DUE = _NOW + """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[3]), 'LIMIT', 0,
                       tonumber(ARGV[1]))
for _, id in ipairs(ids) do
  redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[2]), id)
end
return ids
"""

# KEYS: job key, outbox. ARGV: job id. Marks the job dispatched (a record that expired meanwhile is
# not recreated) and takes it out of the outbox.
_DISPATCHED = """
if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('HSET', KEYS[1], 'dispatched', 1) end
return redis.call('ZREM', KEYS[2], ARGV[1])
"""

# KEYS: a schedule. ARGV: seconds, job id, then "XX" to move an entry only while it is there.
# The job's entry is due in that many seconds.
_SCHEDULE = _NOW + """
if ARGV[3] == 'XX' then
  return redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[1]), ARGV[2])
end
return redis.call('ZADD', KEYS[1], now + tonumber(ARGV[1]), ARGV[2])
"""

# KEYS: job key, its event stream. ARGV: events maxlen, the final "job" event's data, seconds the
# stream is kept from now, then field/value pairs. Sets them, and emits the event, only when the
# job exists and is not finished; the stream then expires sooner than the record, unless the record
# expires first.
_FINISH = _EMIT + """
if redis.call('EXISTS', KEYS[1]) == 0 or redis.call('HEXISTS', KEYS[1], 'finished_at') == 1 then
  return 0
end
redis.call('HSET', KEYS[1], unpack(ARGV, 4))
emit(ARGV[1], 'job', ARGV[2])
local keep = tonumber(ARGV[3]) * 1000
local ttl = redis.call('PTTL', KEYS[2])
if ttl < 0 or ttl > keep then redis.call('PEXPIRE', KEYS[2], keep) end
return 1
"""

# KEYS: job key, its event stream. ARGV: stem field, stem JSON, now, "1" when the stem is running,
# events maxlen, the stem event's type and data, the data of a "job running" event. A record that
# expired is not recreated. A running stem makes a queued job running (final states are set by
# finish), and that change has its own event, before the stem's.
_UPDATE_STEM = _EMIT + """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2], 'updated_at', ARGV[3])
if ARGV[4] == '1' then
  redis.call('HSETNX', KEYS[1], 'started_at', ARGV[3])
  if redis.call('HGET', KEYS[1], 'state') == 'queued' then
    redis.call('HSET', KEYS[1], 'state', 'running')
    emit(ARGV[5], 'job', ARGV[8])
  end
end
emit(ARGV[5], ARGV[6], ARGV[7])
return 1
"""

# KEYS: job key, its event stream. ARGV: now, events maxlen, the "cancelling" job event's data.
# -1: no such job; 0: the job is finished (nothing changes); 1: cancellation requested (now, or
# already before: the state and event are written once).
_CANCEL = _EMIT + """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
if redis.call('HEXISTS', KEYS[1], 'finished_at') == 1 then return 0 end
if redis.call('HSETNX', KEYS[1], 'cancel_requested_at', ARGV[1]) == 1 then
  redis.call('HSET', KEYS[1], 'state', 'cancelling', 'updated_at', ARGV[1])
  emit(ARGV[2], 'job', ARGV[3])
end
return 1
"""

# KEYS: lock key. ARGV: token. Deletes the lock only when this token still holds it.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class JobNotFound(KeyError):
    """No job with that id (never existed, or expired)."""


class JobFinished(Exception):
    """The job reached a final state before it could be cancelled."""

    def __init__(self, job_id: str, state: str):
        super().__init__(f"job {job_id} already finished ({state})")
        self.job_id = job_id
        self.state = state


class IdempotencyConflict(ValueError):
    """A different request body was already submitted under this generation_request_id."""

    def __init__(self, generation_request_id: str, job_id: str):
        super().__init__(f"generation_request_id {generation_request_id!r} was already used for a "
                         f"different request (job {job_id})")
        self.generation_request_id = generation_request_id
        self.job_id = job_id


@dataclass(frozen=True)
class Submission:
    """Result of ``JobStore.create``: the job id and whether this call created it."""

    job_id: str
    created: bool
    #: the job's state when the call returned ("queued" for a job just created)
    status: str = "queued"


class InvalidCursor(ValueError):
    """A job-list cursor that ``list_jobs`` did not make (or that was altered)."""


#: A Redis stream entry id, "<milliseconds>-<sequence>": the events' ids.
EVENT_ID = re.compile(r"^[0-9]{1,20}-[0-9]{1,20}$")


def event_id_key(event_id: str) -> tuple[int, int]:
    """A stream id as a tuple that sorts as Redis orders them.

    Raises:
        ValueError: not "<milliseconds>-<sequence>".
    """
    if not EVENT_ID.match(event_id):
        raise ValueError(f"not a stream id: {event_id!r}")
    ms, seq = event_id.split("-")
    return int(ms), int(seq)


@dataclass(frozen=True)
class JobEvent:
    """One entry of a job's event stream.

    ``type`` is "job" (the job's status changed), "stem" (a stem's status changed) or "progress"
    (a running stem's progress moved); ``data`` is the event's JSON text, as stored.
    """

    job_id: str
    id: str
    type: str
    data: str
    #: the id as a sortable tuple (see ``event_id_key``)
    key: tuple[int, int] = dataclasses.field(compare=False, repr=False)

    @classmethod
    def from_entry(cls, job_id: str, entry_id: str, fields: dict) -> "JobEvent":
        return cls(job_id, entry_id, fields.get("type", "job"), fields.get("data", "{}"),
                   event_id_key(entry_id))

    @property
    def final(self) -> bool:
        """Whether this event reports the job's final state (the last event of a job)."""
        if self.type != "job":
            return False
        try:
            return json.loads(self.data).get("status") in FINAL_JOB_STATES
        except (ValueError, AttributeError):
            return False


@dataclass(frozen=True)
class JobPage:
    """One page of ``list_jobs``: job summaries, newest first, and the cursor of the next page
    (None at the end of the list)."""

    jobs: list[dict]
    next_cursor: str | None


class EventFeed:
    """Reads the event streams of many jobs with one blocking ``XREAD`` on its own connection.

    One per gateway process (api.events.EventHub): each client watching a job would otherwise hold
    a blocking Redis connection of its own. ``wake`` ends a ``wait`` in progress (from another
    thread or greenlet), so that it can start again with more streams: the wait also reads this
    feed's own small stream, to which ``wake`` appends.

    Every event ends the wait, and the next one names every watched stream again: the command is
    packed here from each stream's cached bytes (redis-py's packing of ~500 arguments was 0.5 ms
    per event, most of the gateway's CPU, in bench.events).

    Args:
        client: a Redis client of its own (``decode_responses``), whose socket timeout is above
            the longest wait (``JobStore.event_feed`` makes one).
        max_block_seconds: the longest ``wait``.
    """

    def __init__(self, client: redis.Redis, max_block_seconds: float = 5.0):
        self._redis = client
        self.max_block_seconds = max_block_seconds
        self._wake_key = f"{_PREFIX}:events-wake:{secrets.token_hex(8)}"
        self._wake_after = "0-0"
        self._keys: dict[str, bytes] = {}  # job id -> its stream key as a RESP bulk string
        self._ids: dict[tuple[int, int], bytes] = {}  # position -> its id as a RESP bulk string

    def wait(self, positions: dict[str, tuple[int, int]], block_seconds: float) -> list[JobEvent]:
        """The events after ``positions`` (job id → the last event id already had, as
        ``event_id_key`` gives it), waiting up to ``block_seconds`` (at most
        ``max_block_seconds``) for one; empty when the wait timed out or was woken.

        Raises:
            redis.RedisError: Redis is unreachable.
        """
        block = max(1, int(1000 * min(block_seconds, self.max_block_seconds)))
        job_ids = list(positions)
        head = ["XREAD", "COUNT", str(EVENTS_MAXLEN), "BLOCK", str(block), "STREAMS"]
        parts = [f"*{len(head) + 2 * len(job_ids) + 2}\r\n".encode()]
        parts += [_bulk(word) for word in head]
        parts += [self._key(job_id) for job_id in job_ids]
        parts.append(_bulk(self._wake_key))
        parts += [self._id(positions[job_id]) for job_id in job_ids]
        parts.append(_bulk(self._wake_after))
        reply = self._call(b"".join(parts)) or []
        if len(self._ids) > 4 * len(job_ids) + 100:  # positions move on: forget old ones
            self._ids.clear()
        if len(self._keys) > 2 * len(job_ids) + 100:
            self._keys = {job_id: self._keys[job_id] for job_id in job_ids if job_id in self._keys}
        if isinstance(reply, dict):  # RESP3 clients answer a map
            reply = list(reply.items())
        events = []
        prefix = JobStore._events_key("")
        for key, entries in reply:
            key = key.decode() if isinstance(key, bytes) else key
            if key == self._wake_key:
                self._wake_after = entries[-1][0] if entries else self._wake_after
                continue
            job_id = key[len(prefix):]
            for entry_id, values in entries:
                fields = dict(zip(values[::2], values[1::2])) if isinstance(values, list) else values
                events.append(JobEvent.from_entry(job_id, entry_id, fields))
        return events

    def _key(self, job_id: str) -> bytes:
        packed = self._keys.get(job_id)
        if packed is None:
            packed = self._keys[job_id] = _bulk(JobStore._events_key(job_id))
        return packed

    def _id(self, position: tuple[int, int]) -> bytes:
        packed = self._ids.get(position)
        if packed is None:
            packed = self._ids[position] = _bulk(f"{position[0]}-{position[1]}")
        return packed

    def _call(self, packed: bytes):
        """Send a packed command on a pooled connection and read its answer; a connection that
        failed is dropped (it may hold half an answer)."""
        pool = self._redis.connection_pool
        connection = pool.get_connection()
        try:
            connection.send_packed_command([packed])
            return connection.read_response()
        except BaseException:
            connection.disconnect()
            raise
        finally:
            pool.release(connection)

    def wake(self) -> None:
        """End the ``wait`` in progress (or make the next one return at once)."""
        with self._redis.pipeline(transaction=False) as pipe:
            pipe.xadd(self._wake_key, {"w": "1"}, maxlen=1)
            pipe.expire(self._wake_key, 600)  # only a wait in progress needs it
            pipe.execute()

    def close(self) -> None:
        self._redis.close()


def _bulk(text: str) -> bytes:
    """``text`` as a RESP bulk string."""
    data = text.encode()
    return b"$%d\r\n%s\r\n" % (len(data), data)


def canonical_json(request: dict) -> str:
    """The request as canonical JSON: sorted keys, no spaces, ASCII."""
    return json.dumps(request, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def request_fingerprint(request: dict, canonical: str | None = None) -> str:
    """SHA-256 of the canonical JSON of a request (key order and spacing do not matter)."""
    return hashlib.sha256((canonical or canonical_json(request)).encode()).hexdigest()


class JobStore:
    """Job records in Redis.

    Args:
        url: Redis URL (the Celery result backend).
        ttl_seconds: lifetime of a job record and its idempotency key.
        retry_seconds: how long a command keeps retrying a lost connection (about; exponential
            waits up to 2 s). Workers wait out a Redis restart rather than fail a finished stem;
            the gateway keeps redis-py's short default and answers 503.
    """

    def __init__(self, url: str, ttl_seconds: int = 7 * 24 * 3600, *, retry_seconds: float = 0):
        if not url.startswith(("redis://", "rediss://", "unix://", "sentinel://")):
            raise ValueError(f"the job store needs a Redis result backend, got {url!r}")
        options = {}
        if retry_seconds > 0:
            options["retry"] = Retry(ExponentialBackoff(cap=2.0, base=0.05),
                                     retries=6 + int(retry_seconds / 2))
        # One place builds every Redis client: sentinel:// URLs, and wait_replicas (each write
        # acknowledged by replicas before it returns), are tasks.redis_connection's.
        self._redis: redis.Redis = redis_connection.connect(
            url, decode_responses=True, socket_timeout=10, socket_connect_timeout=5,
            health_check_interval=30, **options)
        self.ttl = ttl_seconds
        self._url = url  # for the event feed's own client
        self._create = self._redis.register_script(_CREATE)
        self._finish = self._redis.register_script(_FINISH)
        self._release = self._redis.register_script(_RELEASE)
        self._claim_due = self._redis.register_script(_CLAIM_DUE)
        self._schedule = self._redis.register_script(_SCHEDULE)
        self._dispatched = self._redis.register_script(_DISPATCHED)
        self._update_stem = self._redis.register_script(_UPDATE_STEM)
        self._cancel = self._redis.register_script(_CANCEL)

    # --- keys -------------------------------------------------------------------------------------
    @staticmethod
    def _job_key(job_id: str) -> str:
        return f"{_PREFIX}:job:{job_id}"

    @staticmethod
    def _request_key(generation_request_id: str) -> str:
        return f"{_PREFIX}:request:{generation_request_id}"

    _OUTBOX = f"{_PREFIX}:outbox"
    #: Pending callback deliveries, scored by when their next attempt is due.
    _DELIVERIES = f"{_PREFIX}:deliveries"

    @staticmethod
    def _delivery_lock_key(job_id: str) -> str:
        return f"{_PREFIX}:delivery-lock:{job_id}"

    @staticmethod
    def _events_key(job_id: str) -> str:
        return f"{_PREFIX}:events:{job_id}"

    @staticmethod
    def _index_key(owner: str) -> str:
        # "_": jobs submitted without API keys (an open API); key identifiers are hex.
        return f"{_PREFIX}:job-index:{owner or '_'}"

    # --- writes -----------------------------------------------------------------------------------
    def create(self, request: dict, stems: list[str], callback_url: str | None,
               plan: dict | None = None, *, owner: str = "") -> Submission:
        """Record a new job, or return the existing one for the same generation_request_id.

        ``plan`` is the job's musical plan (stems.plan.MusicalPlan.to_dict) when it is known at
        submission; otherwise the first worker to make it records it (``claim_plan``). ``owner``
        identifies the API key the job was submitted with (api.auth.key_id; never the key itself;
        "" without keys): ``list_jobs`` shows a caller its own jobs.

        One Redis round trip. A created job is due in the outbox at once (see ``claim_due``), has
        its "queued" event and is in its owner's index. Only what differs per job is written;
        fields still at their initial value (a queued stem, no delivery attempt) are filled in by
        ``get``.

        Raises:
            IdempotencyConflict: the id was used with a different body.
        """
        canonical = canonical_json(request)
        fingerprint = request_fingerprint(request, canonical)
        job_id = secrets.token_hex(16)
        request_key = self._request_key(request["generation_request_id"])
        claim = json.dumps({"job_id": job_id, "fingerprint": fingerprint})
        now = time.time()
        fields = {
            "job_id": job_id,
            "request": canonical,
            "stems": json.dumps(stems),
            "state": "queued",
            "created_at": now,
            "callback_url": callback_url or "",
            "delivery_state": "pending" if callback_url else "none",
        }
        if plan is not None:
            fields["plan"] = json.dumps(plan, separators=(",", ":"))
        if owner:
            fields["owner"] = owner
        pairs = [str(item) for kv in fields.items() for item in kv]
        event = _event_data(job_id=job_id, status="queued")
        existing = self._create(
            keys=[request_key, self._job_key(job_id), self._OUTBOX, self._events_key(job_id),
                  self._index_key(owner)],
            args=[claim, self.ttl, self._job_key(""), job_id, EVENTS_MAXLEN, event, repr(now),
                  repr(now - self.ttl), *pairs])
        if existing is None:
            return Submission(job_id, created=True)
        existing = json.loads(existing)
        if existing.get("fingerprint") != fingerprint:
            raise IdempotencyConflict(request["generation_request_id"], existing.get("job_id", ""))
        return Submission(existing["job_id"], created=False)

    # --- outbox -------------------------------------------------------------------------------------
    def claim_due(self, limit: int, lease_seconds: float) -> list[str]:
        """Up to ``limit`` job ids due for dispatch, oldest first, leased to this caller: they are
        due again after ``lease_seconds`` unless ``mark_dispatched`` (or ``drop_from_outbox``)
        takes them out first."""
        return list(self._claim_due(keys=[self._OUTBOX], args=[limit, lease_seconds, 0]))

    def defer_dispatch(self, job_id: str, seconds: float) -> None:
        """Make an outbox entry due again in ``seconds`` (its dispatch failed)."""
        self._schedule(keys=[self._OUTBOX], args=[seconds, job_id, "XX"])

    def mark_dispatched(self, job_id: str) -> None:
        """Note that the job's chord was sent and take it out of the outbox (one round trip)."""
        self._dispatched(keys=[self._job_key(job_id), self._OUTBOX], args=[job_id])

    def drop_from_outbox(self, job_id: str) -> None:
        """Take an entry out of the outbox without dispatching it (its record is gone)."""
        self._redis.zrem(self._OUTBOX, job_id)

    def outbox_backlog(self) -> tuple[int, float]:
        """Entries in the outbox, and how many seconds the most overdue one is past its due time
        (0 when none is): a growing backlog means no dispatcher is running."""
        with self._redis.pipeline(transaction=False) as pipe:
            pipe.zcard(self._OUTBOX)
            pipe.zrange(self._OUTBOX, 0, 0, withscores=True)
            pipe.time()
            count, oldest, (seconds, micros) = pipe.execute()
        if not oldest:
            return int(count), 0.0
        return int(count), max(0.0, seconds + micros / 1e6 - float(oldest[0][1]))

    def count_run(self, job_id: str, stem: str) -> int:
        """Count one generation of a stem (more than one: a task was delivered again)."""
        return int(self._redis.hincrby(self._job_key(job_id), f"runs:{stem}", 1))

    def update_stem(self, job_id: str, stem: str, status: str, progress: float, **extra) -> None:
        """Set a stem's state and progress (0..1); ``extra`` keys (url, error, ...) are merged in.

        The write and its event are one script: a "stem" event when the stem's status changed, a
        "progress" event when only a running stem's progress did, and a "job" event before it when
        this makes a queued job running. A job whose record expired is left alone.
        """
        if status not in STEM_STATES:
            raise ValueError(f"unknown stem state {status!r}")
        key = self._job_key(job_id)
        current = json.loads(self._redis.hget(key, f"stem:{stem}") or "{}")
        before = current.get("status")
        current.update(extra, stem=stem, status=status, progress=round(float(progress), 4))
        kind = "progress" if before == status == "running" else "stem"
        event = _event_data(job_id=job_id, stem=stem, status=status, progress=current["progress"],
                            url=current.get("url") if status == "completed" else None,
                            error=current.get("error") if status == "failed" else None)
        self._update_stem(keys=[key, self._events_key(job_id)],
                          args=[f"stem:{stem}", json.dumps(current), repr(time.time()),
                                "1" if status == "running" else "0", EVENTS_MAXLEN, kind, event,
                                _event_data(job_id=job_id, status="running")])

    def request_cancel(self, job_id: str) -> None:
        """Ask for the job to stop: its state becomes ``cancelling`` (with a "job" event) and its
        stem tasks see ``cancel_requested``: a queued stem never starts, a running one stops at
        the batch's next decoding step, finished stems stay stored; finalize then records
        ``cancelled``. Asking again changes nothing.

        Raises:
            JobNotFound: no such job.
            JobFinished: the job already has a final state.
        """
        answer = self._cancel(keys=[self._job_key(job_id), self._events_key(job_id)],
                              args=[repr(time.time()), EVENTS_MAXLEN,
                                    _event_data(job_id=job_id, status="cancelling")])
        if answer == -1:
            raise JobNotFound(job_id)
        if answer == 0:
            raise JobFinished(job_id, self._redis.hget(self._job_key(job_id), "state") or "finished")

    def cancel_requested(self, job_id: str) -> bool:
        """True once ``request_cancel`` was called for the job."""
        return bool(self._redis.hexists(self._job_key(job_id), "cancel_requested_at"))

    def claim_plan(self, job_id: str, plan: dict) -> dict:
        """Record the job's plan unless one is recorded already; return the recorded one.

        Every stem task of a job that makes its plan on the worker (from the source audio) calls
        this, so all of them follow the first plan made, even where two analyses could differ.
        """
        stored = self._redis.eval(
            "redis.call('HSETNX', KEYS[1], 'plan', ARGV[1]) return redis.call('HGET', KEYS[1], 'plan')",
            1, self._job_key(job_id), json.dumps(plan, separators=(",", ":")))
        return json.loads(stored)

    @staticmethod
    def _excerpt_key(job_id: str) -> str:
        return f"{_PREFIX}:source-excerpt:{job_id}"

    def record_source(self, job_id: str, source: dict, plan: dict | None,
                      excerpt: bytes | None = None) -> dict:
        """Record the job's analysed song once (tasks.song_source): its source record, the plan
        made from it (replacing one made at submission, which it extends) and the conditioning
        excerpt (kept as long as the job). The first record wins; returns the recorded one."""
        stored = self._redis.eval(
            "if redis.call('HSETNX', KEYS[1], 'source', ARGV[1]) == 1 then"
            "  if ARGV[2] ~= '' then redis.call('HSET', KEYS[1], 'plan', ARGV[2]) end"
            "  if ARGV[3] ~= '' then redis.call('SET', KEYS[2], ARGV[3], 'EX', ARGV[4]) end "
            "end return redis.call('HGET', KEYS[1], 'source')",
            2, self._job_key(job_id), self._excerpt_key(job_id),
            json.dumps(source, separators=(",", ":")),
            json.dumps(plan, separators=(",", ":")) if plan is not None else "",
            base64.b64encode(excerpt).decode() if excerpt else "", self.ttl)
        return json.loads(stored)

    def source_of(self, job_id: str) -> dict | None:
        """The job's recorded source (``record_source``), or None before its analysis."""
        raw = self._redis.hget(self._job_key(job_id), "source")
        return json.loads(raw) if raw else None

    def drop_source_excerpt(self, job_id: str) -> None:
        """Forget the job's conditioning excerpt (the job is finished: no stem needs it)."""
        self._redis.delete(self._excerpt_key(job_id))

    def source_excerpt(self, job_id: str) -> bytes | None:
        """The job's conditioning excerpt (``record_source``), or None."""
        raw = self._redis.get(self._excerpt_key(job_id))
        return base64.b64decode(raw) if raw else None

    def finish(self, job_id: str, state: str, callback_payload: dict) -> bool:
        """Record the job's final state and the callback body that reports it, once: returns
        False (and changes nothing) when the job was already finished or does not exist.

        The final "job" event is written with it; the job's event stream is then kept for
        EVENTS_KEEP_AFTER_FINISH_SECONDS."""
        if state not in JOB_STATES:
            raise ValueError(f"unknown job state {state!r}")
        now = time.time()
        fields = {"state": state, "finished_at": now, "updated_at": now,
                  "callback_payload": json.dumps(callback_payload)}
        pairs = [str(item) for kv in fields.items() for item in kv]
        event = _event_data(job_id=job_id, status=state, error=callback_payload.get("error"))
        return bool(self._finish(keys=[self._job_key(job_id), self._events_key(job_id)],
                                 args=[EVENTS_MAXLEN, event, EVENTS_KEEP_AFTER_FINISH_SECONDS,
                                       *pairs]))

    def mark_delivery_enqueued(self, job_id: str) -> None:
        """Note that the delivery task was sent (finalize, run again, does not send another); the
        delivery is due now (see ``claim_overdue_deliveries``)."""
        self._redis.hset(self._job_key(job_id), "delivery_enqueued", 1)
        self._schedule(keys=[self._DELIVERIES], args=[0, job_id, ""])

    def claim_overdue_deliveries(self, grace_seconds: float, limit: int,
                                 lease_seconds: float) -> list[str]:
        """Up to ``limit`` jobs whose delivery is still pending ``grace_seconds`` after its attempt
        was due (its Celery message is presumed lost), leased to this caller for ``lease_seconds``.
        A delivery attempt reschedules its job (``update_delivery``); a settled one leaves."""
        return list(self._claim_due(keys=[self._DELIVERIES],
                                    args=[limit, lease_seconds, grace_seconds]))

    def delivery_settled(self, job_id: str) -> None:
        """Take a job out of the pending deliveries (delivered, failed for good, or gone)."""
        self._redis.zrem(self._DELIVERIES, job_id)

    def acquire_delivery_lock(self, job_id: str, seconds: float) -> str | None:
        """A token when this caller may attempt the job's delivery now, None while another attempt
        holds the lock. The lock lapses after ``seconds`` (longer than one attempt can take)."""
        token = uuid.uuid4().hex
        ok = self._redis.set(self._delivery_lock_key(job_id), token, nx=True,
                             px=max(1, int(seconds * 1000)))
        return token if ok else None

    def release_delivery_lock(self, job_id: str, token: str) -> None:
        self._release(keys=[self._delivery_lock_key(job_id)], args=[token])

    def start_delivery_attempt(self, job_id: str) -> tuple[int, float]:
        """Count a delivery attempt and mark the delivery as in progress; returns the attempt number
        and the time of the first attempt (the start of the delivery window)."""
        key, now = self._job_key(job_id), time.time()
        with self._redis.pipeline() as pipe:
            pipe.hincrby(key, "delivery_attempts", 1)
            pipe.hsetnx(key, "delivery_started_at", now)
            pipe.hget(key, "delivery_started_at")
            pipe.hset(key, mapping={"delivery_state": "delivering", "updated_at": now})
            attempts, _, started, _ = pipe.execute()
        return int(attempts), float(started)

    def update_delivery(self, job_id: str, state: str, *, attempts: int | None = None,
                        error: str = "", next_attempt_at: float | None = None) -> None:
        """Record the callback delivery state (pending, delivering, delivered, failed) and, while
        pending, when the next attempt is due."""
        if state not in DELIVERY_STATES:
            raise ValueError(f"unknown delivery state {state!r}")
        now = time.time()
        fields: dict = {"delivery_state": state, "delivery_error": error, "updated_at": now,
                        "delivery_next_at": next_attempt_at or ""}
        if attempts is not None:
            fields["delivery_attempts"] = attempts
        if state == "delivered":
            fields["delivered_at"] = now
        self._redis.hset(self._job_key(job_id), mapping=fields)
        if state in ("delivered", "failed"):
            self.delivery_settled(job_id)
        elif next_attempt_at is not None:
            self._schedule(keys=[self._DELIVERIES], args=[max(0.0, next_attempt_at - now), job_id, ""])

    # --- reads --------------------------------------------------------------------------------------
    def get(self, job_id: str) -> dict:
        """The job's record as plain data (see api.schemas.JobStatus for the shape).

        Raises:
            JobNotFound.
        """
        raw = self._redis.hgetall(self._job_key(job_id))
        if not raw:
            raise JobNotFound(job_id)
        stem_states = _stem_states(json.loads(raw["stems"]), raw)
        for state in stem_states:
            if raw.get(f"runs:{state['stem']}"):
                state["runs"] = int(raw[f"runs:{state['stem']}"])
        progress = sum(s.get("progress", 0.0) for s in stem_states) / max(len(stem_states), 1)
        request = json.loads(raw["request"])
        callback = {
            "url": raw.get("callback_url") or None,
            "state": raw.get("delivery_state", "none"),
            "attempts": int(raw.get("delivery_attempts", 0)),
            "error": raw.get("delivery_error") or None,
        }
        for field, name in (("delivery_next_at", "next_attempt_at"), ("delivered_at", "delivered_at")):
            if raw.get(field):
                callback[name] = float(raw[field])
        payload = json.loads(raw["callback_payload"]) if raw.get("callback_payload") else None
        return {
            "job_id": raw["job_id"],
            "generation_request_id": request["generation_request_id"],
            "audio_file_id": request.get("audio_file_id"),
            "status": raw["state"],
            "progress": round(progress, 4),
            "created_at": float(raw["created_at"]),
            "updated_at": float(raw.get("updated_at") or raw["created_at"]),
            "finished_at": float(raw["finished_at"]) if raw.get("finished_at") else None,
            "stems": stem_states,
            "callback": callback,
            "request": request,
            "dispatched": raw.get("dispatched") == "1",
            "delivery_enqueued": raw.get("delivery_enqueued") == "1",
            "callback_payload": payload,
            "plan": json.loads(raw["plan"]) if raw.get("plan") else None,
            "cancel_requested_at": (float(raw["cancel_requested_at"])
                                    if raw.get("cancel_requested_at") else None),
            "coherence": (payload or {}).get("coherence"),
            "error": (payload or {}).get("error"),
        }

    # --- events -------------------------------------------------------------------------------------
    def read_events(self, job_id: str, after: str | None = None) -> list[JobEvent]:
        """The job's stored events after the id ``after`` (all of them when None), oldest first.

        Raises:
            ValueError: ``after`` is not a stream id.
        """
        start = "-" if after is None else f"({after}"
        if after is not None:
            event_id_key(after)
        key, events = self._events_key(job_id), []
        while True:
            entries = self._redis.xrange(key, start, "+", count=EVENTS_MAXLEN)
            events.extend(JobEvent.from_entry(job_id, entry_id, fields) for entry_id, fields in entries)
            if len(entries) < EVENTS_MAXLEN:
                return events
            start = f"({entries[-1][0]}"

    def event_feed(self, max_block_seconds: float = 5.0) -> EventFeed:
        """A new ``EventFeed`` on this store's Redis, with a client of its own: its connection
        blocks for up to ``max_block_seconds`` (one per gateway process; see EventFeed)."""
        client = redis_connection.connect(self._url, decode_responses=True,
                                          socket_timeout=max_block_seconds + 10,
                                          socket_connect_timeout=5, health_check_interval=30)
        return EventFeed(client, max_block_seconds)

    # --- job list -----------------------------------------------------------------------------------
    def list_jobs(self, owner: str = "", *, status: str | None = None,
                  generation_request_id: str | None = None, limit: int = 20,
                  cursor: str | None = None) -> JobPage:
        """The jobs submitted with the key ``owner`` identifies (see ``create``), newest first,
        ``limit`` at a time, optionally only those in ``status`` or the one job of
        ``generation_request_id``; ``cursor`` is the previous page's ``next_cursor``.

        Index entries whose record expired are skipped and removed. At most LIST_SCAN_MAX entries
        are examined per call, so a page may hold fewer than ``limit`` jobs (even none) and still
        have a next cursor; ``next_cursor`` is None at the end.

        Raises:
            InvalidCursor: ``cursor`` was not made here.
        """
        after = _decode_cursor(cursor) if cursor else None
        if generation_request_id is not None:
            return JobPage(self._job_of_request(owner, generation_request_id, status, after), None)
        index = self._index_key(owner)
        # Without a status filter one more entry than asked tells whether there is a next page.
        batch_size = limit + 1 if status is None else min(max(4 * limit, 50), 200)
        jobs: list[dict] = []
        gone: list[str] = []
        scanned, exhausted = 0, False
        while len(jobs) < limit and scanned < LIST_SCAN_MAX and not exhausted:
            entries = self._index_page(index, after, batch_size)
            records = self._summaries([job_id for job_id, _ in entries])
            exhausted = len(entries) < batch_size
            for (job_id, score), record in zip(entries, records):
                if len(jobs) == limit or scanned == LIST_SCAN_MAX:
                    exhausted = False  # entries remain after the cursor
                    break
                scanned += 1
                after = (score, job_id)
                if record is None:
                    gone.append(job_id)
                elif status is None or record[1]["status"] == status:
                    jobs.append(record[1])
        if gone:
            self._redis.zrem(index, *gone)
        return JobPage(jobs, None if exhausted or after is None else _encode_cursor(*after))

    def _index_page(self, index: str, after: tuple[float, str] | None,
                    count: int) -> list[tuple[str, float]]:
        """Up to ``count`` (job id, score) entries of an index, newest first, after ``after``
        ((score, job id) of the last entry already seen). Entries of equal score are ordered by
        job id, descending, as Redis orders them."""
        if after is None:
            return self._redis.zrevrangebyscore(index, "+inf", "-inf", start=0, num=count,
                                                withscores=True)
        score, last = after
        page: list[tuple[str, float]] = []
        offset = 0
        while len(page) < count:
            # Inclusive of the cursor's score: other jobs created at the same instant follow it.
            batch = self._redis.zrevrangebyscore(index, repr(score), "-inf", start=offset, num=count,
                                                 withscores=True)
            page.extend((job_id, s) for job_id, s in batch if s < score or job_id < last)
            if len(batch) < count:
                break
            offset += len(batch)
        return page[:count]

    def _summaries(self, job_ids: list[str]) -> list[tuple[str, dict] | None]:
        """Each job's owner and summary (None where the record is gone), in one round trip. Reads
        only the fields a summary shows: a finished job's callback body is most of its record."""
        if not job_ids:
            return []
        with self._redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.hmget(self._job_key(job_id), *_SUMMARY_FIELDS)
            rows = pipe.execute()
        return [_summary(row) for row in rows]

    def _job_of_request(self, owner: str, generation_request_id: str, status: str | None,
                        after: tuple[float, str] | None) -> list[dict]:
        """The job of a generation_request_id (its idempotency claim), when ``owner`` submitted it,
        it is in ``status`` (when given) and it comes after the cursor ``after``."""
        claim = self._redis.get(self._request_key(generation_request_id))
        try:
            job_id = json.loads(claim)["job_id"] if claim else None
        except (ValueError, TypeError, KeyError):
            job_id = None
        if not job_id:
            return []
        record = self._summaries([job_id])[0]
        if record is None or record[0] != owner:
            return []
        summary = record[1]
        if status is not None and summary["status"] != status:
            return []
        if after is not None and (summary["created_at"], job_id) >= after:
            return []
        return [summary]

    def ping(self) -> None:
        """Raise redis.RedisError when the store is unreachable."""
        self._redis.ping()


#: The stems a job may have (a summary reads their fields by name).
_STEMS = ("guitar", "bass", "drums")
#: The record fields a job-list summary reads.
_SUMMARY_FIELDS = ("job_id", "request", "stems", "state", "created_at", "updated_at", "finished_at",
                   "owner", *(f"stem:{s}" for s in _STEMS))


def _stem_states(stems: list[str], fields: dict) -> list[dict]:
    """Each stem's stored state (``fields["stem:<name>"]``), or queued when none is stored yet."""
    return [json.loads(fields[f"stem:{s}"]) if fields.get(f"stem:{s}") else
            {"stem": s, "status": "queued", "progress": 0.0} for s in stems]


def _summary(row: list) -> tuple[str, dict] | None:
    """(owner, job-list entry) from a ``_summaries`` HMGET row; None when the record is gone."""
    fields = dict(zip(_SUMMARY_FIELDS, row))
    if not fields.get("request") or not fields.get("stems"):
        return None
    request = json.loads(fields["request"])
    stems = []
    for state in _stem_states(json.loads(fields["stems"]), fields):
        entry = {"stem": state["stem"], "status": state["status"],
                 "progress": state.get("progress", 0.0)}
        if state.get("error"):
            entry["error"] = state["error"]
        stems.append(entry)
    created = float(fields["created_at"])
    return fields["owner"] or "", {
        "job_id": fields["job_id"],
        "generation_request_id": request["generation_request_id"],
        "audio_file_id": request.get("audio_file_id"),
        "status": fields["state"],
        "progress": round(sum(s["progress"] for s in stems) / max(len(stems), 1), 4),
        "created_at": created,
        "updated_at": float(fields["updated_at"] or created),
        "finished_at": float(fields["finished_at"]) if fields["finished_at"] else None,
        "stems": stems,
    }


def _event_data(**fields) -> str:
    """An event's JSON text (None values left out)."""
    return json.dumps({k: v for k, v in fields.items() if v is not None}, separators=(",", ":"))


def _encode_cursor(score: float, job_id: str) -> str:
    """An opaque cursor for the position (score, job id) in a job index."""
    raw = f"{score!r}:{job_id}".encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


_CURSOR = re.compile(r"^[A-Za-z0-9_-]{1,200}$")
_JOB_ID = re.compile(r"^[A-Za-z0-9]{1,64}$")


def _decode_cursor(cursor: str) -> tuple[float, str]:
    """The position a cursor holds.

    Raises:
        InvalidCursor.
    """
    if not _CURSOR.match(cursor):
        raise InvalidCursor("not a cursor this service made")
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        score_text, _, job_id = raw.partition(":")
        score = float(score_text)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise InvalidCursor("not a cursor this service made") from None
    if not math.isfinite(score) or not _JOB_ID.match(job_id):
        raise InvalidCursor("not a cursor this service made")
    return score, job_id
