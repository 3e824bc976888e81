"""The workers' JobStore: one per Celery app, waiting out a Redis restart, and the retry policy of
the tasks that write to it."""

from __future__ import annotations

import redis

from tasks.app import app
from tasks.jobstore import JobStore

#: How long the workers' job-store commands wait out a lost Redis connection (a restart).
JOBSTORE_RETRY_SECONDS = 60
#: The job store still unreachable after that: the task is retried later (a declared retry), so a
#: longer Redis outage neither loses a job's callback nor reports a generated stem as failed.
JOBSTORE_UNREACHABLE = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)
JOBSTORE_RETRIES = dict(autoretry_for=JOBSTORE_UNREACHABLE, retry_backoff=2, retry_backoff_max=20,
                        retry_jitter=True)


def job_store(celery_app=app) -> JobStore:
    """The JobStore of an app's settings (one per app object)."""
    store = getattr(celery_app, "_stemgen_jobstore", None)
    if store is None:
        settings = celery_app.stemgen_settings
        store = JobStore(settings.result_backend, settings.job_ttl_seconds,
                         retry_seconds=JOBSTORE_RETRY_SECONDS)
        celery_app._stemgen_jobstore = store
    return store
