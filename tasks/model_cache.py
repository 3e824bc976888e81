"""The worker's model cache: one loaded StemEngine (and its StemBatcher) per worker process, and
the Demucs separator once an ensemble request needs it; the only global state.

Loaded at process start (the ``ModelStart`` bootstep, see tasks.worker) and reused by every task, as
cog's ``setup()``/``predict()`` split does; nothing reloads per task.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from stems.batching import GenerationDeadline, StemBatcher
from stems.decoding import batch_buckets
from stems.engine import StemEngine, resolve_device
from tasks import device_watchdog

if TYPE_CHECKING:  # loaded on first use: demucs is imported only by workers that separate
    from stems.separation import Separator

_engines: dict[tuple[str, str], StemEngine] = {}
_separators: dict[tuple[str, str], "Separator"] = {}
_batchers: dict[tuple[str, str], StemBatcher] = {}
_lock = threading.Lock()


def get_engine(model: str, device: str = "auto", *, num_threads: int | None = None,
               attention_backend: str = "torch", mode: str = "auto", precision: str = "auto",
               buckets: tuple[int, ...] | None = None) -> StemEngine:
    """The process's engine for (model, device), loaded on first use with the given torch thread
    count (None: all cores on CPU, 1 on CUDA), attention backend, decoding mode, precision and
    batch buckets (see stems.engine.StemEngine).

    Raises:
        stems.engine.ModelLoadError.
    """
    key = (model, device)
    with _lock:
        engine = _engines.get(key)
        if engine is None:
            if num_threads is None and resolve_device(device).startswith("cuda"):
                num_threads = 1
            engine = _engines[key] = StemEngine(model, device, num_threads=num_threads,
                                                attention_backend=attention_backend, mode=mode,
                                                precision=precision, buckets=buckets)
        return engine



def engine_for(settings) -> StemEngine:
    """The process's engine for the model, device, thread count, attention backend, decoding
    mode and precision of ``settings``."""
    return get_engine(settings.musicgen_model, settings.stemgen_device,
                      num_threads=settings.torch_num_threads or None,
                      attention_backend=settings.attention_backend, mode=settings.engine_mode,
                      precision=settings.engine_precision,
                      buckets=batch_buckets(settings.batch_max_size))


def loaded() -> list[dict]:
    """What this process has loaded (for health reports)."""
    return [{"model": m, "device": e.device, "melody": e.supports_melody, "mode": e.mode,
             "precision": e.precision, "warm_up_capture_seconds": e.capture_seconds,
             "decoder_fallbacks": e.decoder.stats.fallbacks if e.decoder else None,
             "self_check": e.self_check_result,
             "decoding_bytes": ({"static_cache": e.decoder.cache_bytes(),
                                 "graph_pool": e.decoder.stats.graph_pool_bytes}
                                if e.decoder else None)}
            for (m, _), e in _engines.items()]


def decoding_precision(model: str) -> str | None:
    """The precision the process's engine of ``model`` decodes in (None: not loaded here)."""
    for (name, _), engine in list(_engines.items()):
        if name == model:
            return engine.precision
    return None


def get_batcher(settings) -> StemBatcher:
    """The process's batcher over the engine of ``settings`` (see stems.batching)."""
    key = (settings.musicgen_model, settings.stemgen_device)
    engine = engine_for(settings)
    with _lock:
        batcher = _batchers.get(key)
        if batcher is None:
            batcher = _batchers[key] = StemBatcher(
                engine, max_batch=settings.batch_max_size,
                window_seconds=settings.batch_window_seconds,
                bucket_seconds=settings.batch_bucket_seconds,
                deadline=GenerationDeadline(settings.generation_deadline_seconds,
                                            settings.generation_deadline_min_seconds,
                                            settings.generation_deadline_slack),
                on_hung=device_watchdog.generation_hung)
        return batcher


def get_separator(settings) -> "Separator":
    """The process's Demucs separator (``SEPARATION_MODEL``, on the engine's device), loaded on
    the first ensemble request: workers that never separate never pay for it.

    Raises:
        stems.separation.SeparationError: the model cannot be loaded.
    """
    from stems.separation import Separator

    device = engine_for(settings).device
    key = (settings.separation_model, device)
    with _lock:
        separator = _separators.get(key)
        if separator is None:
            separator = _separators[key] = Separator(
                settings.separation_model, device, shifts=settings.separation_shifts,
                overlap=settings.separation_overlap,
                num_threads=settings.torch_num_threads or None)
        return separator
