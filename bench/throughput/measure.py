"""Seconds of audio per wall second: plain audiocraft against stemgen's worker path.

Both load the same random-weight checkpoint through ``MusicGen.get_pretrained(dir)`` (the engine
through ``StemEngine(dir)``), use the same prompts, sampling parameters and clip length, and are
warmed up before they are timed.

- baseline: plain audiocraft, one ``MusicGen.generate([prompt])`` per stem, in turn, on the calling
  thread, with torch's default thread settings;
- worker path: a ``StemEngine`` with its speed settings behind a ``StemBatcher``, one thread per
  stem calling ``batcher.generate`` at once, as the Celery threads pool issues a request's stems.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from stems.engine import SamplingParams


def checkpoint_dir(scale: str) -> Path:
    """A random-weight checkpoint of ``scale``, written once (about a minute for small) and reused."""
    from stems.checkpoint import is_checkpoint_dir, write_checkpoint

    root = Path(os.environ.get("STEMGEN_CACHE_DIR") or Path(tempfile.gettempdir()) / "stemgen")
    target = root / f"bench-{scale}-musicgen"
    if not is_checkpoint_dir(target):
        root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f"{scale}-", dir=root))
        write_checkpoint(staging, scale, seed=0)
        try:
            staging.rename(target)
        except OSError:  # another run won the race; same seed, same files
            pass
    return target


@dataclass
class Run:
    """One timed generation of a request's stems."""

    label: str
    clips: int
    seconds_per_clip: float
    wall_seconds: float
    cpu_seconds: float  # process CPU time during the run (all threads)
    batch_sizes: list[int] = field(default_factory=list)

    @property
    def throughput(self) -> float:
        """Seconds of audio generated per wall second."""
        return self.clips * self.seconds_per_clip / self.wall_seconds


def median_throughput(runs: list[Run]) -> float:
    return statistics.median(r.throughput for r in runs)


class Baseline:
    """Plain audiocraft: ``MusicGen.generate`` once per stem, one after the other.

    Loaded, warmed up and run each on a thread that ends (``stems.engine.on_short_lived_thread``),
    so that its torch thread pool does not outlive it and slow the worker path measured after it
    in the same process; plain audiocraft on one thread runs as fast as on the main thread."""

    def __init__(self, directory: Path, device: str, sampling: SamplingParams):
        os.environ.setdefault("USER", "stemgen")
        from audiocraft.models import MusicGen

        from stems.engine import on_short_lived_thread

        self.model = on_short_lived_thread(MusicGen.get_pretrained, str(directory), device=device)
        self.sampling = sampling

    def _params(self, seconds: float) -> None:
        s = self.sampling
        self.model.set_generation_params(use_sampling=True, top_k=s.top_k, top_p=s.top_p,
                                         temperature=s.temperature, cfg_coef=s.cfg_coef,
                                         duration=seconds)

    def warm_up(self) -> None:
        from stems.engine import on_short_lived_thread

        self._params(0.5)
        on_short_lived_thread(self.model.generate, ["warm up"])

    def run(self, prompts: list[str], seconds: float) -> Run:
        from stems.engine import on_short_lived_thread

        return on_short_lived_thread(self._run, prompts, seconds)

    def _run(self, prompts: list[str], seconds: float) -> Run:
        self._params(seconds)
        started, cpu = time.perf_counter(), time.process_time()
        for prompt in prompts:
            wav = self.model.generate([prompt])
            wav.cpu().numpy()  # the audio in host memory, as the worker needs it
        return Run("baseline", len(prompts), seconds, time.perf_counter() - started,
                   time.process_time() - cpu, [1] * len(prompts))


class WorkerPath:
    """stemgen's worker: StemEngine (speed settings) + StemBatcher, stems on concurrent threads."""

    def __init__(self, directory: Path, device: str, sampling: SamplingParams, *,
                 engine_options: dict, max_batch: int, window_seconds: float,
                 bucket_seconds: float = 1.0):
        from stems.batching import StemBatcher
        from stems.engine import StemEngine, on_short_lived_thread

        # as the worker loads it (tasks.worker.ModelStart): on a thread that ends
        self.engine = on_short_lived_thread(StemEngine, str(directory), device, **engine_options)
        self.batcher = StemBatcher(self.engine, max_batch=max_batch, window_seconds=window_seconds,
                                   bucket_seconds=bucket_seconds)
        self.sampling = sampling

    def warm_up(self, batch_size: int) -> None:
        from stems.engine import on_short_lived_thread

        on_short_lived_thread(self.engine.warm_up, batch_size=min(batch_size, self.batcher.max_batch))

    def run(self, requests: list[list[str]], seconds: float, *, stagger_seconds: float = 0.0,
            label: str = "worker") -> tuple[Run, list[np.ndarray]]:
        """Each request's stems start together; request ``i`` arrives ``i * stagger_seconds`` late.

        Returns the run and the clips (``[channels, samples]`` each) in request/stem order.
        """
        jobs = [(r, prompt) for r, prompts in enumerate(requests) for prompt in prompts]
        clips: list[np.ndarray | None] = [None] * len(jobs)
        errors: list[BaseException] = []
        before = self.batcher.stats()
        start = threading.Barrier(len(jobs) + 1)

        def stem(index: int, request: int, prompt: str) -> None:
            start.wait()
            if request and stagger_seconds:
                time.sleep(request * stagger_seconds)
            try:
                clips[index] = self.batcher.generate(prompt, seconds, sampling=self.sampling,
                                                     progress=_ProgressSink())
            except BaseException as exc:  # reported after the join
                errors.append(exc)

        threads = [threading.Thread(target=stem, args=(i, r, p), daemon=True)
                   for i, (r, p) in enumerate(jobs)]
        for t in threads:
            t.start()
        start.wait()
        started, cpu = time.perf_counter(), time.process_time()
        for t in threads:
            t.join()
        wall, cpu = time.perf_counter() - started, time.process_time() - cpu
        if errors:
            raise errors[0]
        after = self.batcher.stats()
        calls = after.calls - before.calls
        clips_done = after.clips - before.clips
        sizes = list(after.recent_sizes[-calls:]) if calls else []
        assert sum(sizes) == clips_done == len(jobs)
        return Run(label, len(jobs), seconds, wall, cpu, sizes), clips  # type: ignore[return-value]


class _ProgressSink:
    """What the worker's progress reporter does per call, minus Redis: throttle to 2 % steps."""

    def __init__(self):
        self.last = -1.0

    def __call__(self, fraction: float) -> None:
        if fraction - self.last >= 0.02 or fraction >= 1.0:
            self.last = fraction
