"""The outbox: recorded jobs due for dispatch (tasks.dispatcher sends their chords)."""

from __future__ import annotations

from tasks.jobstore.records import OUTBOX


class OutboxMixin:
    """JobStore's outbox operations (``self._redis`` and the registered scripts are JobStore's)."""

    _OUTBOX = OUTBOX

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
