"""What the gateway asks of the task layer: submit a job, read it, check health."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import redis
from celery import chord
from kombu.exceptions import OperationalError

from stemgen_settings import Settings
from storage import StorageError, store_from_settings
from tasks.app import app as celery_app
from tasks.jobstore import JobStore, Submission

log = logging.getLogger(__name__)

#: How long a submission waits for a concurrent identical one to enqueue the job.
_ENQUEUE_WAIT_SECONDS = 3.0

#: What the broker and the job store raise when they cannot be reached.
_UNREACHABLE = (redis.RedisError, OperationalError, ConnectionError, TimeoutError)


class ServiceUnavailable(RuntimeError):
    """The broker or the job store cannot be reached; the caller may retry the same request."""


def enqueue_job(job_id: str, request: dict, stems: list[str]) -> None:
    """Send the job's chord to the broker: one generate_stem per stem, then finalize_request.

    Tasks are named, not imported, so the gateway never imports the audio stack.
    """
    header = [celery_app.signature("stemgen.generate_stem", args=(job_id, stem, request))
              for stem in stems]
    chord(header)(celery_app.signature("stemgen.finalize_request", args=(job_id,)))


@dataclass(frozen=True)
class ComponentHealth:
    ok: bool
    detail: str = ""


class JobService:
    """Submission and status of stem jobs, backed by the Celery broker and the Redis job store.

    Args:
        settings: the service settings (broker, result backend, storage, limits).
    """

    def __init__(self, settings: Settings):
        self.settings = settings
        self.jobs = JobStore(settings.result_backend, settings.job_ttl_seconds)
        self._celery = celery_app

    def submit(self, request: dict, callback_url: str | None) -> Submission:
        """Record the job and enqueue its chord; a repeated identical request returns the same job.

        ``request`` is the validated request as plain JSON data. A job recorded by an earlier call
        that failed (or died) before its chord reached the broker is enqueued by the next identical
        call; of concurrent identical calls only one enqueues (JobStore.claim_enqueue).

        Raises:
            tasks.jobstore.IdempotencyConflict: same generation_request_id, different body.
            ServiceUnavailable: the job store or broker is unreachable (retry the same request).
        """
        stems = list(dict.fromkeys(request["target_stems"]))
        try:
            submission = self.jobs.create(request, stems, callback_url)
            if submission.created or not self.jobs.get(submission.job_id)["enqueued"]:
                self._enqueue_once(submission.job_id, request, stems)
        except _UNREACHABLE as exc:
            raise ServiceUnavailable(f"job store or broker unreachable: {exc.__class__.__name__}") from exc
        return submission

    def _enqueue_once(self, job_id: str, request: dict, stems: list[str]) -> None:
        if not self.jobs.claim_enqueue(job_id):
            # Another call is sending this job's chord: wait for it, briefly. If it does not finish
            # (broker down, or it died), the caller is told to retry rather than told "queued".
            deadline = time.monotonic() + _ENQUEUE_WAIT_SECONDS
            while time.monotonic() < deadline:
                if self.jobs.get(job_id)["enqueued"]:
                    return
                time.sleep(0.05)
            raise ServiceUnavailable("the job is being enqueued by another request; retry")
        try:
            enqueue_job(job_id, request, stems)
        except BaseException:
            self.jobs.release_enqueue(job_id)
            raise
        self.jobs.mark_enqueued(job_id)
        self.jobs.release_enqueue(job_id)

    def get(self, job_id: str) -> dict:
        """The job record.

        Raises:
            tasks.jobstore.JobNotFound. ServiceUnavailable: the job store is unreachable.
        """
        try:
            return self.jobs.get(job_id)
        except _UNREACHABLE as exc:
            raise ServiceUnavailable(f"job store unreachable: {exc.__class__.__name__}") from exc

    # --- health ---------------------------------------------------------------------------------------
    def broker_health(self) -> ComponentHealth:
        try:
            with self._celery.connection_for_write() as conn:
                conn.ensure_connection(max_retries=1, timeout=2)
            self.jobs.ping()
            return ComponentHealth(True)
        except Exception as exc:  # any transport error means "not reachable"
            return ComponentHealth(False, f"{exc.__class__.__name__}: {exc}")

    def storage_health(self) -> ComponentHealth:
        try:
            store_from_settings(self.settings, retry_total=0, timeout_seconds=2).ping()
            return ComponentHealth(True)
        except StorageError as exc:
            return ComponentHealth(False, str(exc))

    def workers(self) -> list[dict]:
        """Workers answering a ping within the configured timeout, with their model and device."""
        try:
            replies = self._celery.control.broadcast(
                "stemgen_info", reply=True, timeout=self.settings.health_worker_timeout_seconds)
        except Exception as exc:
            log.warning("worker inspection failed: %s", exc)
            return []
        return [{"name": name, **info} for reply in replies for name, info in reply.items()]
