"""What the gateway asks of the task layer: submit a job, read it, check health."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from celery import chord

from stemgen_settings import Settings
from storage import StorageError, store_from_settings
from tasks.app import app as celery_app
from tasks.jobstore import JobStore, Submission

log = logging.getLogger(__name__)


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

        ``request`` is the validated request as plain JSON data.

        Raises:
            tasks.jobstore.IdempotencyConflict: same generation_request_id, different body.
            redis.RedisError / kombu errors: the job store or broker is unreachable.
        """
        stems = list(dict.fromkeys(request["target_stems"]))
        submission = self.jobs.create(request, stems, callback_url)
        # A job recorded by an earlier call that died before enqueueing is enqueued now.
        if submission.created or not self.jobs.get(submission.job_id)["enqueued"]:
            enqueue_job(submission.job_id, request, stems)
            self.jobs.mark_enqueued(submission.job_id)
        return submission

    def get(self, job_id: str) -> dict:
        """The job record (raises tasks.jobstore.JobNotFound)."""
        return self.jobs.get(job_id)

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
