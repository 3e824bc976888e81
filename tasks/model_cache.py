"""The worker's model cache: one loaded StemEngine per worker process (the only global state).

Loaded at process start (``worker_process_init``, see tasks.worker) and reused by every task, as
cog's ``setup()``/``predict()`` split does; nothing reloads per task.
"""

from __future__ import annotations

import threading

from stems.engine import StemEngine

_engines: dict[tuple[str, str], StemEngine] = {}
_lock = threading.Lock()


def get_engine(model: str, device: str = "auto") -> StemEngine:
    """The process's engine for (model, device), loaded on first use.

    Raises:
        stems.engine.ModelLoadError.
    """
    key = (model, device)
    with _lock:
        engine = _engines.get(key)
        if engine is None:
            engine = _engines[key] = StemEngine(model, device)
        return engine


def loaded() -> list[dict]:
    """What this process has loaded (for health reports)."""
    return [{"model": m, "device": e.device} for (m, _), e in _engines.items()]
