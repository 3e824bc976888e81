"""Worker process hooks: load the model at process start, answer health questions.

- ``worker_process_init``: each pool process loads MusicGen once (tasks.model_cache) and runs a short
  warm-up generation, so the first request does not pay for loading.
- ``stemgen_info`` remote-control command: the worker's model and device, for ``GET /health``.
"""

from __future__ import annotations

import logging
import os

from celery.signals import worker_process_init
from celery.worker.control import inspect_command

from stems.engine import resolve_device
from tasks.app import app
from tasks.model_cache import get_engine

log = logging.getLogger(__name__)


@worker_process_init.connect
def _load_model(**_):
    settings = app.stemgen_settings
    if not settings.preload_model:
        return
    engine = get_engine(settings.musicgen_model, settings.stemgen_device)
    engine.warm_up()
    log.info("worker process %s: %s loaded on %s", os.getpid(), settings.musicgen_model, engine.device)


@inspect_command(name="stemgen_info")
def stemgen_info(state):
    """Model and device of this worker (remote control: ``app.control.broadcast('stemgen_info')``)."""
    settings = app.stemgen_settings
    return {"model": settings.musicgen_model, "device": resolve_device(settings.stemgen_device)}
