"""The worker's ready flag: a file (WORKER_READY_FILE) and a gauge, set only once the model is
loaded, warmed up and has passed its start self-check, and cleared when the worker stops or a
part of it that serves requests is found broken. The k8s and compose probes read the file
(``test -f``): a Celery ping answers as soon as the consumer runs, whatever the model's state.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from prometheus_client import Gauge

from tasks import metrics
from tasks.metrics import REGISTRY

log = logging.getLogger(__name__)

SELF_CHECK = Gauge("stemgen_decoding_self_check_passed",
                   "1 when the static/graph decoding passed its start self-check, 0 when the worker "
                   "serves audiocraft's eager generate instead (reason label)",
                   ["model", "mode", "precision", "reason"], registry=REGISTRY)
GRAPH_BYTES = Gauge("stemgen_decoding_graph_bytes",
                    "Bytes held for decoding at start: static cache and CUDA-graph pool",
                    ["model", "kind"], registry=REGISTRY)


def mark_ready(path: str, info: dict) -> None:
    """Write the flag (``info`` as JSON: model, device, mode, precision, self-check)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(target.name + ".tmp")
    staging.write_text(json.dumps(info, default=str))
    os.replace(staging, target)
    metrics.worker_ready(True)


def mark_not_ready(path: str, reason: str = "") -> None:
    """Remove the flag (idempotent)."""
    metrics.worker_ready(False)
    try:
        Path(path).unlink()
    except FileNotFoundError:
        return
    if reason:
        log.warning("worker not ready: %s", reason)


def record_decoding(model: str, engine) -> None:
    """Export the engine's self-check and decoding memory."""
    check = engine.self_check_result or {"passed": True, "reason": None}
    SELF_CHECK.labels(model, engine.mode, engine.precision, check["reason"] or "").set(
        1 if check["passed"] else 0)
    decoder = engine.decoder
    if decoder is not None:
        GRAPH_BYTES.labels(model, "static_cache").set(decoder.cache_bytes() if decoder._buffers is not None else 0)
        GRAPH_BYTES.labels(model, "graph_pool").set(decoder.stats.graph_pool_bytes)
