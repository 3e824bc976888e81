"""The Celery application, configured from stemgen settings (Celery's ``config_from_object``).

Start a worker with ``celery -A tasks.app worker`` (it consumes both configured queues; ``-Q``
narrows that, e.g. ``-Q stems`` for GPU workers).
"""

from __future__ import annotations

from celery import Celery
from kombu import Queue

from stemgen_settings import Settings, load_settings
from tasks.redis_connection import celery_url


def celery_config(settings: Settings) -> dict:
    """Celery settings for long, expensive, idempotent tasks.

    - ``task_acks_late`` + ``task_reject_on_worker_lost``: a task whose worker dies is redelivered
      instead of lost (the tasks are idempotent: uploads overwrite the same blob).
    - ``worker_prefetch_multiplier=1``: a worker holds one task at a time, so a long generation does
      not sit on messages another worker could run.
    - ``visibility_timeout`` (Redis broker) above the longest task, so a running task is not handed
      to a second worker. Messages of a worker that died (SIGKILL, OOM, lost node) come back to the
      queue only once they are that old: a Redis deployment trades recovery time for that margin.
      RabbitMQ requeues them as soon as the dead worker's connection closes. Live workers sweep for
      such messages every ``unacked_restore_interval`` seconds (kombu scans only every
      ``unacked_restore_throttle``-th sweep; 1 = every sweep).
    - waiting retries (countdown/ETA) are unacknowledged messages too, so their countdowns stay
      below the visibility timeout (stemgen_settings validates the callback backoff).
    - the broker connection is retried forever, and result-backend writes are retried on
      connection errors, so a broker or Redis restart pauses work instead of failing it.
    - a threads pool: concurrent stem tasks of one worker share the loaded model and are batched into
      one MusicGen call (tasks.model_cache.get_batcher); prefetch is then ``worker_concurrency``.
    - ``sentinel://host:port[,host:port]/db?master=NAME`` URLs (tasks.redis_connection) become
      kombu's and Celery's own form (``sentinel://h1:p/db;sentinel://h2:p/db``) plus
      ``master_name`` in the transport options; stemgen's ``wait_replicas``/``wait_timeout_ms``
      options are the job store's and are dropped here.

    Raises:
        tasks.redis_connection.RedisURLError: a Redis URL of the settings cannot be used.
    """
    broker_url, broker_sentinel = celery_url(settings.broker_url)
    result_backend, result_sentinel = celery_url(settings.result_backend)
    return {
        "broker_url": broker_url,
        # The celery command copies BROKER_URL from the environment into CELERY_BROKER_URL, which
        # Celery prefers over broker_url; the read/write URLs win over it, so the translated
        # sentinel:// form is the one used (see create_celery for the result backend).
        "broker_read_url": broker_url,
        "broker_write_url": broker_url,
        "result_backend": result_backend,
        "result_expires": settings.job_ttl_seconds,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_track_started": True,
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,
        "broker_transport_options": {"visibility_timeout": settings.visibility_timeout_seconds,
                                     "unacked_restore_interval": 10,
                                     "unacked_restore_throttle": 1,
                                     **broker_sentinel},
        "result_backend_always_retry": True,
        "result_backend_max_retries": 20,
        "result_backend_transport_options": {"visibility_timeout": settings.visibility_timeout_seconds,
                                             **result_sentinel},
        "task_default_queue": settings.callbacks_queue,
        # A worker consumes the queue of the model it holds (MUSICGEN_MODEL); the dispatcher sends
        # each job's generation to the queue of the model the job asked for (send_job_chord).
        "task_queues": (Queue(settings.stems_queue_for(settings.musicgen_model)),
                        Queue(settings.callbacks_queue)),
        "task_routes": {
            "stemgen.generate_stem": {"queue": settings.stems_queue_for(settings.musicgen_model)},
            "stemgen.generate_ensemble": {"queue": settings.stems_queue_for(settings.musicgen_model)},
            "stemgen.analyse_source": {"queue": settings.stems_queue_for(settings.musicgen_model)},
            "stemgen.finalize_request": {"queue": settings.callbacks_queue},
            "stemgen.deliver_callback": {"queue": settings.callbacks_queue},
        },
        # Threads: the stem tasks of a worker share one model and batch together (stems.batching).
        "worker_pool": "threads",
        "worker_concurrency": settings.worker_concurrency,
        "worker_hijack_root_logger": False,
    }


def create_celery(settings: Settings) -> Celery:
    """Build a Celery app from settings; the settings object is kept as ``app.stemgen_settings``."""
    app = Celery("stemgen", include=["tasks.stem_tasks", "tasks.callback_delivery", "tasks.worker"])
    config = celery_config(settings)
    app.config_from_object(config)
    # The celery command also copies RESULT_BACKEND into CELERY_RESULT_BACKEND, which Celery prefers
    # over result_backend; the app's backend_cls wins over both, so the translated URL (no
    # sentinel host list, no wait_replicas) is the one Celery uses.
    app.backend_cls = config["result_backend"]
    app.stemgen_settings = settings
    return app


app = create_celery(load_settings())
