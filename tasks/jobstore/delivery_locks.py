"""Callback delivery state: the schedule of pending deliveries and the lock that lets one attempt
run at a time."""

from __future__ import annotations

import time
import uuid

from tasks.jobstore.records import DELIVERIES, DELIVERY_STATES, delivery_lock_key


class DeliveryMixin:
    """JobStore's delivery operations (``self._redis`` and the registered scripts are JobStore's)."""

    #: Pending callback deliveries, scored by when their next attempt is due.
    _DELIVERIES = DELIVERIES

    @staticmethod
    def _delivery_lock_key(job_id: str) -> str:
        return delivery_lock_key(job_id)

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
