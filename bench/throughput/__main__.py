"""``python -m bench.throughput``: generation throughput, plain audiocraft vs stemgen's worker path.

Prints the device, the model, the batch sizes, both throughputs (seconds of audio generated per wall
second) and their ratio; the post-generation overhead of a request (render, upload, callback) as a
share of its model time; the last line is ``throughput_ratio=X``.

    python -m bench.throughput                       # musicgen-small, 3 stems of 10 s (+1 s margin)
    python -m bench.throughput --model medium        # musicgen-medium (1.5B) architecture
    python -m bench.throughput --quick               # tiny model, 2 s: CI smoke (< 1 min)

Weights are random (stems.checkpoint): speed depends on the architecture, not on the weights.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import sys
import time

os.environ.setdefault("USER", "stemgen")  # audiocraft reads it


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from stemgen_settings import load_settings

    settings = load_settings()
    p = argparse.ArgumentParser(prog="python -m bench.throughput", description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=("tiny", "small", "medium"), default="small",
                   help="architecture of the random-weight checkpoint (default: small)")
    p.add_argument("--medium", dest="model", action="store_const", const="medium",
                   help="same as --model medium")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default: auto)")
    p.add_argument("--duration", type=float, default=10.0, help="requested seconds per stem (10)")
    p.add_argument("--margin", type=float, default=settings.generation_margin_seconds,
                   help="extra seconds the worker generates per stem (GENERATION_MARGIN_SECONDS, "
                        f"{settings.generation_margin_seconds:g}); both paths generate duration+margin")
    p.add_argument("--stems", type=int, choices=(1, 2, 3), default=3, help="stems per request (3)")
    p.add_argument("--repeats", type=int, default=1, help="timed runs of each path (1; median)")
    p.add_argument("--requests", type=int, default=2,
                   help="also time this many concurrent requests through the batcher (2; 0 or 1 "
                        "skips the cross-request run)")
    p.add_argument("--stagger", type=float, default=0.01,
                   help="seconds between the arrivals of concurrent requests (0.01)")
    p.add_argument("--max-batch", type=int, default=None,
                   help=f"batcher max_batch (default: max(BATCH_MAX_SIZE={settings.batch_max_size}, "
                        "stems x requests))")
    p.add_argument("--window", type=float, default=settings.batch_window_seconds,
                   help=f"batcher window, seconds (BATCH_WINDOW_SECONDS, {settings.batch_window_seconds:g})")
    p.add_argument("--precision", default=settings.engine_precision,
                   help=f"worker path's ENGINE_PRECISION ({settings.engine_precision})")
    p.add_argument("--mode", default=settings.engine_mode,
                   help=f"worker path's ENGINE_MODE ({settings.engine_mode})")
    p.add_argument("--threads", type=int, default=None,
                   help="engine num_threads for the worker path (default: torch's default)")
    p.add_argument("--no-kv-buffer", dest="kv_buffer", action="store_false",
                   help="worker path without the self-attention key/value buffer")
    p.add_argument("--no-cross-cache", dest="cross_attention_cache", action="store_false",
                   help="worker path without the cross-attention key/value cache")
    p.add_argument("--no-pipeline", dest="pipeline", action="store_false",
                   help="skip the render/upload/callback overhead measurement")
    p.add_argument("--quick", action="store_true",
                   help="CI smoke: tiny model, 2 s stems, one repeat (finishes in < 1 min)")
    args = p.parse_args(argv)
    if args.quick:
        args.model, args.duration, args.repeats = "tiny", 2.0, 1
    if args.max_batch is None:
        args.max_batch = max(settings.batch_max_size, args.stems * max(1, args.requests))
    args.settings = settings
    return args


def describe_device(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(torch.device(device))} (torch {torch.__version__})"
    cpu = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"cpu: {cpu}, {os.cpu_count()} cores, torch {torch.__version__} "
            f"(default intra-op threads {torch.get_num_threads()})")


def load_average() -> str:
    try:
        return "/".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def _busy_cpu_seconds() -> float | None:
    """CPU seconds the whole machine has spent busy since boot (/proc/stat, Linux), or None."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def others_cores(since_busy: float | None, since_own: float, since_wall: float) -> float | None:
    """Cores' worth of CPU that processes other than this one used since the given marks.

    The machine's busy time (/proc/stat) minus this process's CPU time (all its threads), over the
    wall time: unlike the load average at the end, it does not count the bench's own threads.
    """
    now = _busy_cpu_seconds()
    if now is None or since_busy is None:
        return None
    wall = time.perf_counter() - since_wall
    return max(0.0, (now - since_busy) - (time.process_time() - since_own)) / wall if wall > 0 else None


def busy_warning() -> None:
    """Other processes on the cores make torch's OpenMP threads wait on each other at every op:
    then 2-thread runs slow down several-fold at random and the figures mean little."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        return
    if load > 0.5 * (os.cpu_count() or 1):
        print(f"WARNING: machine busy (1-min load {load:.2f} on {os.cpu_count()} cores): timings are "
              "unreliable; rerun on an idle machine")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from bench.throughput.measure import Baseline, WorkerPath, checkpoint_dir, median_throughput
    from stems.engine import SamplingParams, resolve_device
    from stems.prompts import build_stem_prompt
    from stemgen_settings import STEM_NAMES

    settings = args.settings
    device = resolve_device(args.device)
    seconds = args.duration + args.margin
    stems = list(STEM_NAMES[: args.stems])
    prompts = [build_stem_prompt(stem, 120.0, style="rock") for stem in stems]
    sampling = SamplingParams(top_k=settings.default_top_k, top_p=settings.default_top_p,
                              temperature=settings.default_temperature, cfg_coef=settings.default_cfg_coef)
    engine_options = {"num_threads": args.threads, "kv_buffer": args.kv_buffer,
                      "cross_attention_cache": args.cross_attention_cache,
                      "precision": args.precision, "mode": args.mode}
    bench_started = time.perf_counter()
    busy_at_start, own_at_start = _busy_cpu_seconds(), time.process_time()

    print(f"device: {describe_device(device)}")
    print(f"load average at start (1/5/15 min): {load_average()}")
    busy_warning()
    t = time.perf_counter()
    directory = checkpoint_dir(args.model)
    print(f"model: musicgen-{args.model} architecture, random weights, {directory} "
          f"(ready in {time.perf_counter() - t:.1f}s)")
    print(f"request: {args.stems} stems x {args.duration:g}s (+{args.margin:g}s margin = {seconds:g}s "
          f"generated per stem), sampling {sampling}, repeats {args.repeats}")
    torch.manual_seed(0)

    # Both models stay loaded so that their runs interleave (fair under a changing machine load),
    # except medium, whose two copies would need ~16 GB: it runs one path after the other.
    sequential = args.model == "medium"
    baseline = Baseline(directory, device, sampling)
    baseline.warm_up()
    baseline_runs, worker_runs = [], []
    if sequential:
        baseline_runs = [baseline.run(prompts, seconds) for _ in range(args.repeats)]
        del baseline
        gc.collect()
    worker = WorkerPath(directory, device, sampling, engine_options=engine_options,
                        max_batch=args.max_batch, window_seconds=args.window)
    worker.warm_up(len(prompts))
    print(f"worker path: StemEngine {worker.engine.settings}, StemBatcher max_batch={args.max_batch} "
          f"window={args.window:g}s")
    clips = None
    for i in range(args.repeats):
        order = ("worker", "baseline") if i % 2 else ("baseline", "worker")
        for which in order:
            if which == "baseline" and not sequential:
                baseline_runs.append(baseline.run(prompts, seconds))
            elif which == "worker":
                run, clips = worker.run([prompts], seconds)
                worker_runs.append(run)
    for run in baseline_runs + worker_runs:
        print(f"  {run.label:9s} {run.clips} clips x {run.seconds_per_clip:g}s in {run.wall_seconds:7.2f}s "
              f"wall ({run.cpu_seconds:7.2f}s CPU), batch sizes {run.batch_sizes}: "
              f"{run.throughput:.4f} audio-s/s")
    base_tp, worker_tp = median_throughput(baseline_runs), median_throughput(worker_runs)
    ratio = worker_tp / base_tp
    print(f"baseline (plain audiocraft, one generate per stem): {base_tp:.4f} s audio / s")
    print(f"stemgen worker path (batched, engine settings):     {worker_tp:.4f} s audio / s")
    print(f"ratio worker/baseline: {ratio:.2f}x")

    if args.requests > 1:
        many = [prompts] * args.requests
        run, _ = worker.run(many, seconds, stagger_seconds=args.stagger, label="requests")
        print(f"cross-request: {args.requests} concurrent {args.stems}-stem requests "
              f"({args.stagger * 1000:g} ms apart): {run.clips} clips in {run.wall_seconds:.2f}s wall, "
              f"model calls with batch sizes {run.batch_sizes}: {run.throughput:.4f} s audio / s "
              f"({run.throughput / base_tp:.2f}x baseline)")

    if args.pipeline and clips is not None:
        from bench.throughput.pipeline import Pipeline
        from stems.render import warm_up as render_warm_up

        model_seconds = statistics_median([r.wall_seconds for r in worker_runs])
        pipeline = Pipeline(settings)
        try:
            stems_audio = dict(zip(stems, clips))
            t = time.perf_counter()
            render_warm_up(worker.engine.sample_rate)  # as tasks.worker does at process start
            warm_up_seconds = time.perf_counter() - t
            cold = pipeline.run(stems_audio, worker.engine.sample_rate, duration_seconds=args.duration)
            warm = pipeline.run(stems_audio, worker.engine.sample_rate, duration_seconds=args.duration)
        finally:
            pipeline.close()
        per = {k: sum(v) for k, v in warm.stage_seconds.items()}
        print(f"pipeline after generation ({args.stems} stems x {args.duration:g}s, stems on "
              f"concurrent threads, upload: {warm.upload}): {warm.wall_seconds:.3f}s wall "
              f"= {100 * warm.wall_seconds / model_seconds:.2f}% of model time {model_seconds:.2f}s "
              f"(summed over stems: render {per['render']:.3f}s, upload {per['upload']:.3f}s, "
              f"callback {per['callback']:.3f}s; first request in a process: {cold.wall_seconds:.3f}s, after "
              f"the worker's render warm-up of {warm_up_seconds:.3f}s)")

    others = others_cores(busy_at_start, own_at_start, bench_started)
    print(f"load average at end (1/5/15 min): {load_average()} (the bench's own threads included); "
          f"bench wall {time.perf_counter() - bench_started:.0f}s")
    if others is not None:
        print(f"other processes used {others:.2f} of {os.cpu_count()} cores during the bench"
              + (" (WARNING: timings are unreliable; rerun on an idle machine)" if others > 0.25 else ""))
    print(f"throughput_ratio={ratio:.2f}")
    return 0


def statistics_median(values: list[float]) -> float:
    import statistics

    return statistics.median(values)


if __name__ == "__main__":
    sys.exit(main())
