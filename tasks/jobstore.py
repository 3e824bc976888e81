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
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
import uuid
from dataclasses import dataclass

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

STEM_STATES = ("queued", "running", "completed", "failed")
JOB_STATES = ("queued", "running", "completed", "failed", "partial")
DELIVERY_STATES = ("none", "pending", "delivering", "delivered", "failed")

_PREFIX = "stemgen"

# Lua: the Redis server's clock in seconds, as ``now`` (outbox scores use the server's clock: no
# skew between the gateway's and the workers' hosts).
_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
"""

# KEYS: request key, new job key, outbox. ARGV: claim JSON, ttl, job key prefix, job id, then the
# record's fields. An existing claim wins while its record exists; a claim whose record is gone is
# replaced. A new job is due in the outbox at once.
_CREATE = _NOW + """
local claim = redis.call('GET', KEYS[1])
if claim then
  local ok, existing = pcall(cjson.decode, claim)
  if ok and type(existing) == 'table' and existing['job_id']
     and redis.call('EXISTS', ARGV[3] .. existing['job_id']) == 1 then
    return claim
  end
end
redis.call('HSET', KEYS[2], unpack(ARGV, 5))
redis.call('EXPIRE', KEYS[2], ARGV[2])
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
redis.call('ZADD', KEYS[3], now, ARGV[4])
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

# KEYS: job key. ARGV: field/value pairs. Sets them only when the job exists and is not finished.
_FINISH = """
if redis.call('EXISTS', KEYS[1]) == 0 or redis.call('HEXISTS', KEYS[1], 'finished_at') == 1 then
  return 0
end
redis.call('HSET', KEYS[1], unpack(ARGV))
return 1
"""

# KEYS: lock key. ARGV: token. Deletes the lock only when this token still holds it.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class JobNotFound(KeyError):
    """No job with that id (never existed, or expired)."""


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
        if not url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"the job store needs a Redis result backend, got {url!r}")
        options = {}
        if retry_seconds > 0:
            options["retry"] = Retry(ExponentialBackoff(cap=2.0, base=0.05),
                                     retries=6 + int(retry_seconds / 2))
        self._redis = redis.Redis.from_url(url, decode_responses=True, socket_timeout=10,
                                           socket_connect_timeout=5, health_check_interval=30,
                                           **options)
        self.ttl = ttl_seconds
        self._create = self._redis.register_script(_CREATE)
        self._finish = self._redis.register_script(_FINISH)
        self._release = self._redis.register_script(_RELEASE)
        self._claim_due = self._redis.register_script(_CLAIM_DUE)
        self._schedule = self._redis.register_script(_SCHEDULE)
        self._dispatched = self._redis.register_script(_DISPATCHED)

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

    # --- writes -----------------------------------------------------------------------------------
    def create(self, request: dict, stems: list[str], callback_url: str | None,
               plan: dict | None = None) -> Submission:
        """Record a new job, or return the existing one for the same generation_request_id.

        ``plan`` is the job's musical plan (stems.plan.MusicalPlan.to_dict) when it is known at
        submission; otherwise the first worker to make it records it (``claim_plan``).

        One Redis round trip. A created job is due in the outbox at once (see ``claim_due``).
        Only what differs per job is written; fields still at their initial value (a queued stem,
        no delivery attempt) are filled in by ``get``.

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
        pairs = [str(item) for kv in fields.items() for item in kv]
        existing = self._create(keys=[request_key, self._job_key(job_id), self._OUTBOX],
                                args=[claim, self.ttl, self._job_key(""), job_id, *pairs])
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
        """Set a stem's state and progress (0..1); ``extra`` keys (url, error, ...) are merged in."""
        if status not in STEM_STATES:
            raise ValueError(f"unknown stem state {status!r}")
        key = self._job_key(job_id)
        current = json.loads(self._redis.hget(key, f"stem:{stem}") or "{}")
        current.update(extra, stem=stem, status=status, progress=round(float(progress), 4))
        with self._redis.pipeline() as pipe:
            pipe.hset(key, mapping={f"stem:{stem}": json.dumps(current), "updated_at": time.time()})
            if status == "running":
                # A running stem makes a queued job running; final states are set by finalize.
                pipe.hsetnx(key, "started_at", time.time())
            pipe.execute()
        if status == "running":
            self._redis.eval(
                "if redis.call('HGET', KEYS[1], 'state') == 'queued' then "
                "redis.call('HSET', KEYS[1], 'state', 'running') end", 1, key)

    def claim_plan(self, job_id: str, plan: dict) -> dict:
        """Record the job's plan unless one is recorded already; return the recorded one.

        Every stem task of a job that makes its plan on the worker (from the source audio) calls
        this, so all of them follow the first plan made, even where two analyses could differ.
        """
        stored = self._redis.eval(
            "redis.call('HSETNX', KEYS[1], 'plan', ARGV[1]) return redis.call('HGET', KEYS[1], 'plan')",
            1, self._job_key(job_id), json.dumps(plan, separators=(",", ":")))
        return json.loads(stored)

    def finish(self, job_id: str, state: str, callback_payload: dict) -> bool:
        """Record the job's final state and the callback body that reports it, once: returns
        False (and changes nothing) when the job was already finished or does not exist."""
        if state not in JOB_STATES:
            raise ValueError(f"unknown job state {state!r}")
        now = time.time()
        fields = {"state": state, "finished_at": now, "updated_at": now,
                  "callback_payload": json.dumps(callback_payload)}
        pairs = [str(item) for kv in fields.items() for item in kv]
        return bool(self._finish(keys=[self._job_key(job_id)], args=pairs))

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
        stems = json.loads(raw["stems"])
        stem_states = [json.loads(raw[f"stem:{s}"]) if f"stem:{s}" in raw else
                       {"stem": s, "status": "queued", "progress": 0.0} for s in stems]
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
            "coherence": (payload or {}).get("coherence"),
            "error": (payload or {}).get("error"),
        }

    def ping(self) -> None:
        """Raise redis.RedisError when the store is unreachable."""
        self._redis.ping()
