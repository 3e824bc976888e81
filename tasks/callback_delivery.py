"""Callback delivery: ``deliver_callback`` POSTs a finished job's callback (tasks.callbacks), retried
on its own with exponential backoff for the delivery window, so a down backend never causes a stem
to be generated again. ``finalize_request`` (tasks.stem_tasks) hands each job's callback to it once;
the outbox dispatcher sends it again for a delivery whose message was lost (tasks.dispatcher).
"""

from __future__ import annotations

import logging
import time

from celery.utils.time import get_exponential_backoff_interval

import stemgen_logging
from tasks import metrics
from tasks.app import app
from tasks.callback_target import CallbackPolicy
from tasks.callbacks import CallbackError, CallbackRetryableError, post_callback
from tasks.jobstore import JobNotFound, JobStore
from tasks.worker_jobstore import JOBSTORE_RETRIES, job_store

log = logging.getLogger(__name__)


def delivery_countdown(settings, attempts: int, elapsed_seconds: float) -> float | None:
    """Seconds until the next delivery attempt after ``attempts`` failed ones, or None when the
    delivery window (counted from the first attempt) is used up. Doubling from
    callback_backoff_seconds up to callback_backoff_max_seconds; the last attempt falls at the end
    of the window."""
    remaining = settings.callback_delivery_window_seconds - elapsed_seconds
    if remaining <= 0:
        return None
    backoff = get_exponential_backoff_interval(
        factor=settings.callback_backoff_seconds, retries=max(0, attempts - 1),
        maximum=settings.callback_backoff_max_seconds, full_jitter=False)
    return max(1.0, min(float(backoff), remaining))


def delivery_lock_seconds(settings) -> float:
    """Longer than one attempt can take: DNS, connect, read, bookkeeping."""
    return settings.callback_connect_timeout_seconds + settings.callback_timeout_seconds + 30


@app.task(bind=True, name="stemgen.deliver_callback", max_retries=None, **JOBSTORE_RETRIES)
def deliver_callback(self, job_id: str) -> str:
    """POST the job's callback; on connection errors, timeouts, 5xx, 408 and 429 retried with
    exponential backoff for ``callback_delivery_window_seconds``, then marked failed.

    At most one attempt per job runs at a time (a Redis lock), and the delivered/failed state is
    checked under it, so copies of this task (a redelivered message, a finalize that ran twice)
    cannot POST a second time after a success. A copy that finds the lock taken tries again after
    the lock's lifetime, in case the holder's worker died mid-attempt.
    """
    settings = self.app.stemgen_settings
    jobs = job_store(self.app)
    lock_seconds = delivery_lock_seconds(settings)
    token = jobs.acquire_delivery_lock(job_id, lock_seconds)
    if token is None:
        # (The wait stays inside the visibility timeout: a waiting retry is an unacked message.)
        raise self.retry(countdown=min(lock_seconds, settings.visibility_timeout_seconds / 2))
    try:
        return _attempt_delivery(self, settings, jobs, job_id)
    finally:
        jobs.release_delivery_lock(job_id, token)


def _attempt_delivery(task, settings, jobs: JobStore, job_id: str) -> str:
    try:
        job = jobs.get(job_id)
    except JobNotFound:
        log.warning("callback of job %s not sent: the job record is gone", job_id)
        jobs.delivery_settled(job_id)
        return "gone"
    stemgen_logging.bind(generation_request_id=job.get("generation_request_id"))
    if job["callback"]["state"] in ("delivered", "failed"):
        jobs.delivery_settled(job_id)  # a copy re-sent by the sweep finds it done
        return job["callback"]["state"]
    attempts, started_at = jobs.start_delivery_attempt(job_id)
    try:
        post_callback(job["callback"]["url"], job["callback_payload"], event_id=job_id,
                      secret=settings.callback_secret,
                      timeout_seconds=settings.callback_timeout_seconds,
                      connect_timeout_seconds=settings.callback_connect_timeout_seconds,
                      policy=CallbackPolicy.from_settings(settings))
    except CallbackRetryableError as exc:
        countdown = delivery_countdown(settings, attempts, time.time() - started_at)
        if countdown is None:
            log.error("callback of job %s failed for good after %d attempts: %s", job_id, attempts, exc)
            metrics.callback_failed("window")
            jobs.update_delivery(job_id, "failed", error=str(exc))
            return "failed"
        jobs.update_delivery(job_id, "pending", error=str(exc), next_attempt_at=time.time() + countdown)
        log.warning("callback of job %s: attempt %d failed, next in %.0fs: %s",
                    job_id, attempts, countdown, exc)
        raise task.retry(exc=exc, countdown=countdown)
    except CallbackError as exc:
        log.error("callback of job %s refused: %s", job_id, exc)
        metrics.callback_failed("rejected")
        jobs.update_delivery(job_id, "failed", error=str(exc))
        return "failed"
    jobs.update_delivery(job_id, "delivered")
    return "delivered"
