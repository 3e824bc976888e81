"""Job records in Redis: what was asked, per-stem state and progress, callback delivery state.

One hash per job (``stemgen:job:{job_id}``) plus one key per ``generation_request_id`` that makes
submission idempotent (``SET NX``). Both live in the Redis of the Celery result backend and expire
after ``job_ttl_seconds``.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from dataclasses import dataclass

import redis

STEM_STATES = ("queued", "running", "completed", "failed")
JOB_STATES = ("queued", "running", "completed", "failed", "partial")
DELIVERY_STATES = ("none", "pending", "delivering", "delivered", "failed")

_PREFIX = "stemgen"


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


def request_fingerprint(request: dict) -> str:
    """SHA-256 of the canonical JSON of a request (key order and spacing do not matter)."""
    canonical = json.dumps(request, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


class JobStore:
    """Job records in Redis.

    Args:
        url: Redis URL (the Celery result backend).
        ttl_seconds: lifetime of a job record and its idempotency key.
    """

    def __init__(self, url: str, ttl_seconds: int = 7 * 24 * 3600):
        if not url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"the job store needs a Redis result backend, got {url!r}")
        self._redis = redis.Redis.from_url(url, decode_responses=True, socket_timeout=10,
                                           socket_connect_timeout=5, health_check_interval=30)
        self.ttl = ttl_seconds

    # --- keys -------------------------------------------------------------------------------------
    @staticmethod
    def _job_key(job_id: str) -> str:
        return f"{_PREFIX}:job:{job_id}"

    @staticmethod
    def _request_key(generation_request_id: str) -> str:
        return f"{_PREFIX}:request:{generation_request_id}"

    # --- writes -----------------------------------------------------------------------------------
    def create(self, request: dict, stems: list[str], callback_url: str | None) -> Submission:
        """Record a new job, or return the existing one for the same generation_request_id.

        Raises:
            IdempotencyConflict: the id was used with a different body.
        """
        fingerprint = request_fingerprint(request)
        job_id = uuid.uuid4().hex
        request_key = self._request_key(request["generation_request_id"])
        claim = json.dumps({"job_id": job_id, "fingerprint": fingerprint})
        if not self._redis.set(request_key, claim, nx=True, ex=self.ttl):
            existing = json.loads(self._redis.get(request_key) or "{}")
            if existing.get("fingerprint") != fingerprint:
                raise IdempotencyConflict(request["generation_request_id"], existing.get("job_id", ""))
            return Submission(existing["job_id"], created=False)
        now = time.time()
        fields = {
            "job_id": job_id,
            "request": json.dumps(request),
            "stems": json.dumps(stems),
            "state": "queued",
            "created_at": now,
            "updated_at": now,
            "callback_url": callback_url or "",
            "delivery_state": "pending" if callback_url else "none",
            "delivery_attempts": 0,
            "delivery_error": "",
            "enqueued": 0,
        }
        for stem in stems:
            fields[f"stem:{stem}"] = json.dumps({"stem": stem, "status": "queued", "progress": 0.0})
        key = self._job_key(job_id)
        with self._redis.pipeline() as pipe:
            pipe.hset(key, mapping=fields)
            pipe.expire(key, self.ttl)
            pipe.execute()
        return Submission(job_id, created=True)

    def mark_enqueued(self, job_id: str) -> None:
        """Note that the job's Celery chord was sent to the broker."""
        self._redis.hset(self._job_key(job_id), "enqueued", 1)

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

    def finish(self, job_id: str, state: str, callback_payload: dict) -> None:
        """Record the job's final state and the callback body that reports it."""
        if state not in JOB_STATES:
            raise ValueError(f"unknown job state {state!r}")
        self._redis.hset(self._job_key(job_id), mapping={
            "state": state, "finished_at": time.time(), "updated_at": time.time(),
            "callback_payload": json.dumps(callback_payload)})

    def update_delivery(self, job_id: str, state: str, *, attempts: int | None = None,
                        error: str = "") -> None:
        """Record the callback delivery state (pending, delivering, delivered, failed)."""
        if state not in DELIVERY_STATES:
            raise ValueError(f"unknown delivery state {state!r}")
        fields: dict = {"delivery_state": state, "delivery_error": error, "updated_at": time.time()}
        if attempts is not None:
            fields["delivery_attempts"] = attempts
        self._redis.hset(self._job_key(job_id), mapping=fields)

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
        stem_states = [json.loads(raw[f"stem:{s}"]) for s in stems]
        progress = sum(s.get("progress", 0.0) for s in stem_states) / max(len(stem_states), 1)
        request = json.loads(raw["request"])
        return {
            "job_id": raw["job_id"],
            "generation_request_id": request["generation_request_id"],
            "audio_file_id": request.get("audio_file_id"),
            "status": raw["state"],
            "progress": round(progress, 4),
            "created_at": float(raw["created_at"]),
            "updated_at": float(raw["updated_at"]),
            "finished_at": float(raw["finished_at"]) if raw.get("finished_at") else None,
            "stems": stem_states,
            "callback": {
                "url": raw.get("callback_url") or None,
                "state": raw.get("delivery_state", "none"),
                "attempts": int(raw.get("delivery_attempts", 0)),
                "error": raw.get("delivery_error") or None,
            },
            "request": request,
            "enqueued": raw.get("enqueued") == "1",
            "callback_payload": json.loads(raw["callback_payload"]) if raw.get("callback_payload") else None,
        }

    def ping(self) -> None:
        """Raise redis.RedisError when the store is unreachable."""
        self._redis.ping()
