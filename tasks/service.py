"""What the gateway asks of the task layer: submit a job, read it, list jobs, follow a job's
events, check health.

api/ reaches the job store only through this module: the job store's errors and event types the
gateway handles are re-exported here."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import redis

from stemgen_settings import Settings
from storage import BlobNotFound, StorageError, store_from_settings
from tasks.app import app as celery_app
from tasks.jobstore import (EVENT_ID, FINAL_JOB_STATES, EventFeed, IdempotencyConflict, InvalidCursor,
                            JobEvent, JobFinished, JobNotFound, JobPage, JobStore, LimitExceeded,
                            Submission,
                            event_id_key)
from tasks.planning import make_job_plan, plan_known_at_submission

log = logging.getLogger(__name__)

__all__ = ["EVENT_ID", "FINAL_JOB_STATES", "ComponentHealth", "EventFeed", "IdempotencyConflict",
           "InvalidCursor", "JobEvent", "JobFinished", "JobNotFound", "JobPage", "JobService",
           "LimitExceeded",
           "ServiceUnavailable", "Submission", "event_id_key"]

#: What the job store raises when it cannot be reached (the gateway does not talk to the broker).
_UNREACHABLE = (redis.RedisError, ConnectionError, TimeoutError)


class ServiceUnavailable(RuntimeError):
    """The job store cannot be reached; the caller may retry the same request."""


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

    def submit(self, request: dict, callback_url: str | None, owner: str = "") -> Submission:
        """Record the job (and its outbox entry, from which tasks.dispatcher sends its chord); a
        repeated identical request returns the same job.

        ``request`` is the validated request as plain JSON data. One job-store round trip for a new
        job (two for a repeated one, which also reads the job's state); the broker is not involved,
        so a job is accepted while the broker is down and dispatched when it is back. The job's
        musical plan is made here and stored with it, unless it waits for the source audio's
        analysis (tasks.planning). ``owner`` identifies the API key the job is submitted with
        (api.auth.key_id; "" without keys): the generation_request_id's idempotency is that key's,
        and the key's limits (MAX_ACTIVE_JOBS_PER_KEY, MAX_SUBMISSIONS_PER_MINUTE_PER_KEY) apply.

        Raises:
            tasks.jobstore.IdempotencyConflict: same generation_request_id and key, different body.
            tasks.jobstore.LimitExceeded: a new job over one of the key's limits.
            ServiceUnavailable: the job store is unreachable (retry the same request).
        """
        stems = list(dict.fromkeys(request["target_stems"]))
        plan = (make_job_plan(request, self.settings.beats_per_bar)
                if plan_known_at_submission(request["parameters"]) else None)
        try:
            submission = self.jobs.create(
                request, stems, callback_url, plan, owner=owner,
                max_active_jobs=self.settings.max_active_jobs_per_key,
                max_submissions_per_minute=self.settings.max_submissions_per_minute_per_key)
            if submission.created:
                return submission
            return replace(submission, status=self.jobs.get(submission.job_id)["status"])
        except _UNREACHABLE as exc:
            raise ServiceUnavailable(f"job store unreachable: {exc.__class__.__name__}") from exc

    def get(self, job_id: str, owner: str | None = None) -> dict:
        """The job record; with ``owner``, only when that key submitted it (JobStore.get).

        Raises:
            tasks.jobstore.JobNotFound. ServiceUnavailable: the job store is unreachable.
        """
        try:
            return self.jobs.get(job_id, owner)
        except _UNREACHABLE as exc:
            raise ServiceUnavailable(f"job store unreachable: {exc.__class__.__name__}") from exc

    def cancel(self, job_id: str, owner: str | None = None) -> dict:
        """Request the job's cancellation (JobStore.request_cancel) and return its record; with
        ``owner``, only when that key submitted it.

        Raises:
            tasks.jobstore.JobNotFound, tasks.jobstore.JobFinished. ServiceUnavailable: the job
            store is unreachable.
        """
        try:
            self.jobs.request_cancel(job_id, owner)
            return self.jobs.get(job_id, owner)
        except _UNREACHABLE as exc:
            raise ServiceUnavailable(f"job store unreachable: {exc.__class__.__name__}") from exc

    def list_jobs(self, owner: str, *, status: str | None = None,
                  generation_request_id: str | None = None, limit: int = 20,
                  cursor: str | None = None) -> JobPage:
        """The jobs submitted with the key ``owner`` identifies ("*": every job), newest first
        (JobStore.list_jobs).

        Raises:
            tasks.jobstore.InvalidCursor. ServiceUnavailable: the job store is unreachable.
        """
        try:
            return self.jobs.list_jobs(owner, status=status, generation_request_id=generation_request_id,
                                       limit=limit, cursor=cursor)
        except _UNREACHABLE as exc:
            raise ServiceUnavailable(f"job store unreachable: {exc.__class__.__name__}") from exc

    def job_events(self, job_id: str, after: str | None = None) -> list[JobEvent]:
        """The job's stored events after the event id ``after`` (all when None), oldest first.

        Raises:
            ValueError: ``after`` is not an event id. ServiceUnavailable: the job store is unreachable.
        """
        try:
            return self.jobs.read_events(job_id, after)
        except _UNREACHABLE as exc:
            raise ServiceUnavailable(f"job store unreachable: {exc.__class__.__name__}") from exc

    def event_feed(self) -> EventFeed:
        """A reader of many jobs' events at once, for the gateway's one event hub per process."""
        return self.jobs.event_feed()

    def open_stem_audio(self, blob_name: str):
        """A finished stem's file, opened for relaying (storage.BlobStore.open_read): its size,
        Content-Type and chunks; None when the blob is gone (deleted, or its container expired).

        Raises:
            ServiceUnavailable: blob storage is unreachable or refuses the read.
        """
        try:
            return store_from_settings(self.settings).open_read(blob_name)
        except BlobNotFound:
            return None
        except StorageError as exc:  # StorageUnavailable and refusals alike: the caller may retry
            raise ServiceUnavailable(f"blob storage: {exc}") from exc

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

    def outbox(self) -> dict | None:
        """Jobs waiting to be dispatched: ``{"pending": n, "overdue_seconds": s}``; None when the
        job store is unreachable."""
        try:
            pending, overdue = self.jobs.outbox_backlog()
        except _UNREACHABLE:
            return None
        return {"pending": pending, "overdue_seconds": round(overdue, 3)}

    def workers(self) -> list[dict]:
        """Workers answering a ping within the configured timeout, with their model and device."""
        try:
            replies = self._celery.control.broadcast(
                "stemgen_info", reply=True, timeout=self.settings.health_worker_timeout_seconds)
        except Exception as exc:
            log.warning("worker inspection failed: %s", exc)
            return []
        return [{"name": name, **info} for reply in replies for name, info in reply.items()]
