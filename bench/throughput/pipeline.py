"""What a request costs after the model: tempo conform + loudness + WAV encode (render_stem), the
upload to blob storage (Azurite), and the callback POST (to a receiver on loopback).

The stems of a request are rendered and uploaded on concurrent threads, as the worker's threads
pool runs them, then one callback is POSTed; the wall time of that phase is the overhead a request
adds to its model time.
"""

from __future__ import annotations

import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np


@dataclass
class PipelineRun:
    wall_seconds: float                       # the whole post-generation phase of one request
    stage_seconds: dict[str, list[float]] = field(default_factory=dict)  # per stem (callback: once)
    upload: str = "azurite"                  # or why it was skipped


class CallbackReceiver:
    """Answers 200 to every POST on 127.0.0.1 (a stand-in for the backend)."""

    def __init__(self):
        self.count = 0
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's naming)
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                receiver.count += 1
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/callback"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Pipeline:
    """render_stem → upload → (after every stem) callback, with the worker's settings."""

    def __init__(self, settings, *, container: str = "stemgen-bench"):
        from storage import StorageError, store_from_settings

        self.settings = settings
        self.receiver = CallbackReceiver()
        self.store = store_from_settings(settings.model_copy(update={"azure_storage_container": container}),
                                         retry_total=1, timeout_seconds=10)
        try:
            self.store.ensure_container()
            self.upload_state = "azurite"
        except StorageError as exc:
            self.store = None
            self.upload_state = f"SKIPPED (blob storage unreachable: {exc})"

    def close(self) -> None:
        self.receiver.close()

    def _stem(self, request_id: str, stem: str, audio: np.ndarray, sample_rate: int, bpm: float,
              duration: float, times: dict[str, list[float]], results: list[dict]) -> None:
        from stems.render import render_stem
        from storage import blob_name_for

        s = self.settings
        t0 = time.perf_counter()
        rendered = render_stem(audio, sample_rate, bpm=bpm, duration_seconds=duration,
                               beats_per_bar=s.beats_per_bar, target_lufs=s.target_lufs,
                               max_true_peak_dbtp=s.max_true_peak_dbtp)
        t1 = time.perf_counter()
        result = {"stem": stem, "status": "completed", **rendered.metadata()}
        if self.store is not None:
            stored = self.store.upload(blob_name_for(request_id, stem), rendered.data,
                                       content_type=rendered.content_type,
                                       metadata={"stem": stem, "bpm": f"{bpm:g}"})
            result.update(blob_name=stored.blob_name, url=stored.url)
        t2 = time.perf_counter()
        times["render"].append(t1 - t0)
        times["upload"].append(t2 - t1)
        results.append(result)

    def run(self, stems: dict[str, np.ndarray], sample_rate: int, *, bpm: float = 120.0,
            duration_seconds: float = 10.0) -> PipelineRun:
        """Post-process one request's generated stems (``{stem: [channels, samples]}``)."""
        from tasks.callbacks import post_callback
        from tasks.stem_tasks import callback_payload, job_state

        request_id = f"bench-{uuid.uuid4().hex[:12]}"
        times: dict[str, list[float]] = {"render": [], "upload": [], "callback": []}
        results: list[dict] = []
        started = time.perf_counter()
        # One thread per stem, as a worker's stem tasks run; result() re-raises a stem's error.
        with ThreadPoolExecutor(max_workers=len(stems)) as pool:
            futures = [pool.submit(self._stem, request_id, stem, audio, sample_rate, bpm,
                                   duration_seconds, times, results)
                       for stem, audio in stems.items()]
        for future in futures:
            future.result()
        t0 = time.perf_counter()
        job = {"job_id": request_id, "generation_request_id": request_id, "audio_file_id": request_id}
        payload = callback_payload(job, results, job_state(results))
        post_callback(self.receiver.url, payload, event_id=request_id, secret="bench-secret",
                      timeout_seconds=10)
        times["callback"].append(time.perf_counter() - t0)
        return PipelineRun(time.perf_counter() - started, times, self.upload_state)
