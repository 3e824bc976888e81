"""JobStore: the job records' writes and reads, with the outbox, delivery and owner-index
operations of its mixins (see tasks.jobstore)."""

from __future__ import annotations

import base64
import json
import math
import secrets
import time

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from tasks import redis_connection
from tasks.jobstore import scripts
from tasks.jobstore.delivery_locks import DeliveryMixin
from tasks.jobstore.outbox import OutboxMixin
from tasks.jobstore.owner_index import OwnerIndexMixin
from tasks.jobstore.protocol import EventFeed
from tasks.jobstore.staging import StagingMixin
from tasks.jobstore.records import (ALL_JOBS, LIVE_JOBS_PREFIX, LimitExceeded, live_jobs_key,
                                    submissions_key)
from tasks.jobstore.records import (EVENTS_KEEP_AFTER_FINISH_SECONDS, EVENTS_MAXLEN, JOB_STATES,
                                    STEM_STATES, IdempotencyConflict, JobEvent, JobFinished,
                                    JobNotFound, Submission, _event_data, _stem_states,
                                    canonical_json, event_id_key, events_key, job_key,
                                    request_fingerprint, request_key,
                                    source_excerpt_key)


class JobStore(OutboxMixin, DeliveryMixin, OwnerIndexMixin, StagingMixin):
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
        self._create = self._redis.register_script(scripts._CREATE)
        self._finish = self._redis.register_script(scripts._FINISH)
        self._release = self._redis.register_script(scripts._RELEASE)
        self._claim_due = self._redis.register_script(scripts._CLAIM_DUE)
        self._schedule = self._redis.register_script(scripts._SCHEDULE)
        self._dispatched = self._redis.register_script(scripts._DISPATCHED)
        self._update_stem = self._redis.register_script(scripts._UPDATE_STEM)
        self._cancel = self._redis.register_script(scripts._CANCEL)

    # --- keys -------------------------------------------------------------------------------------
    @staticmethod
    def _job_key(job_id: str) -> str:
        return job_key(job_id)

    @staticmethod
    def _request_key(generation_request_id: str, owner: str = "") -> str:
        return request_key(generation_request_id, owner)

    #: Retry-After of a refusal for too many active jobs (when one finishes cannot be known).
    active_retry_after_seconds = 30

    @staticmethod
    def _events_key(job_id: str) -> str:
        return events_key(job_id)

    # --- writes -----------------------------------------------------------------------------------
    def create(self, request: dict, stems: list[str], callback_url: str | None,
               plan: dict | None = None, *, owner: str = "", max_active_jobs: int = 0,
               max_submissions_per_minute: int = 0) -> Submission:
        """Record a new job, or return the existing one for the same generation_request_id.

        ``plan`` is the job's musical plan (stems.plan.MusicalPlan.to_dict) when it is known at
        submission; otherwise the first worker to make it records it (``claim_plan``). ``owner``
        identifies the API key the job was submitted with (api.auth.key_id; never the key itself;
        "" without keys): ``list_jobs`` shows a caller its own jobs, ``get`` and
        ``request_cancel`` find only its own, and the idempotency claim of the
        generation_request_id is the owner's (two keys never share one).

        ``max_active_jobs`` and ``max_submissions_per_minute`` (0: no limit) are the owner's
        limits, checked in the same script as the record is written, so that gateways submitting
        at once cannot overrun them; they apply to a new job of an owner, never to a repeated
        request, nor without keys.

        One Redis round trip. A created job is due in the outbox at once (see ``claim_due``), has
        its "queued" event and is in its owner's index. Only what differs per job is written;
        fields still at their initial value (a queued stem, no delivery attempt) are filled in by
        ``get``.

        Raises:
            IdempotencyConflict: the id was used with this owner with a different body.
            LimitExceeded: a new job over one of the owner's limits.
        """
        canonical = canonical_json(request)
        fingerprint = request_fingerprint(request, canonical)
        job_id = secrets.token_hex(16)
        request_key = self._request_key(request["generation_request_id"], owner)
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
        if not owner:
            max_active_jobs = max_submissions_per_minute = 0
        existing = self._create(
            keys=[request_key, self._job_key(job_id), self._OUTBOX, self._events_key(job_id),
                  self._index_key(owner), self._request_key(request["generation_request_id"]),
                  self._index_key(ALL_JOBS), live_jobs_key(owner), submissions_key(owner)],
            args=[claim, self.ttl, self._job_key(""), job_id, EVENTS_MAXLEN, event, repr(now),
                  repr(now - self.ttl), owner, int(max_active_jobs),
                  int(max_submissions_per_minute), *pairs])
        if existing is None:
            return Submission(job_id, created=True)
        if isinstance(existing, list):  # {"limit", name, seconds}
            name, wait = existing[1], float(existing[2])
            value = max_active_jobs if name == "max_active_jobs" else max_submissions_per_minute
            raise LimitExceeded(name, value, max(1, math.ceil(wait)) if wait > 0 else
                                self.active_retry_after_seconds)
        existing = json.loads(existing)
        if existing.get("fingerprint") != fingerprint:
            raise IdempotencyConflict(request["generation_request_id"], existing.get("job_id", ""))
        return Submission(existing["job_id"], created=False)


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

    def request_cancel(self, job_id: str, owner: str | None = None) -> None:
        """Ask for the job to stop: its state becomes ``cancelling`` (with a "job" event) and its
        stem tasks see ``cancel_requested``: a queued stem never starts, a running one stops at
        the batch's next decoding step, finished stems stay stored; finalize then records
        ``cancelled``. Asking again changes nothing. ``owner``: only a job of that owner is
        found (None: any job; see ``get``).

        Raises:
            JobNotFound: no such job (or another owner's).
            JobFinished: the job already has a final state.
        """
        answer = self._cancel(keys=[self._job_key(job_id), self._events_key(job_id)],
                              args=[repr(time.time()), EVENTS_MAXLEN,
                                    _event_data(job_id=job_id, status="cancelling"),
                                    "*" if owner is None else owner])
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
            2, self._job_key(job_id), source_excerpt_key(job_id),
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
        self._redis.delete(source_excerpt_key(job_id))

    def source_excerpt(self, job_id: str) -> bytes | None:
        """The job's conditioning excerpt (``record_source``), or None."""
        raw = self._redis.get(source_excerpt_key(job_id))
        return base64.b64decode(raw) if raw else None

    def finish(self, job_id: str, state: str, callback_payload: dict) -> bool:
        """Record the job's final state and the callback body that reports it, once: returns
        False (and changes nothing) when the job was already finished or does not exist.

        The final "job" event is written with it; the job's event stream is then kept for
        EVENTS_KEEP_AFTER_FINISH_SECONDS, and the job leaves its owner's live jobs."""
        if state not in JOB_STATES:
            raise ValueError(f"unknown job state {state!r}")
        now = time.time()
        fields = {"state": state, "finished_at": now, "updated_at": now,
                  "callback_payload": json.dumps(callback_payload)}
        pairs = [str(item) for kv in fields.items() for item in kv]
        event = _event_data(job_id=job_id, status=state, error=callback_payload.get("error"))
        return bool(self._finish(keys=[self._job_key(job_id), self._events_key(job_id)],
                                 args=[EVENTS_MAXLEN, event, EVENTS_KEEP_AFTER_FINISH_SECONDS,
                                       LIVE_JOBS_PREFIX, job_id, *pairs]))

    # --- reads --------------------------------------------------------------------------------------
    def get(self, job_id: str, owner: str | None = None) -> dict:
        """The job's record as plain data (see api.schemas.JobStatus for the shape).

        ``owner``: only a job submitted with that API key identifier is found, any other is
        JobNotFound, as an unknown id is (existence cannot be probed); None: any job (workers, an
        admin key, an open API).

        Raises:
            JobNotFound.
        """
        raw = self._redis.hgetall(self._job_key(job_id))
        if not raw or (owner is not None and raw.get("owner", "") != owner):
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
            "owner": raw.get("owner", ""),
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

    def ping(self) -> None:
        """Raise redis.RedisError when the store is unreachable."""
        self._redis.ping()
