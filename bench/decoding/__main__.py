"""Decoding speed per engine mode: ms per step, audio-s/s per batch size, token agreement.

    python -m bench.decoding                        # musicgen-small architecture, this device
    python -m bench.decoding --device cuda --model medium --batches 1,3,24
    python -m bench.decoding --quick                # tiny model, 1 s, batches 1 and 3, every precision (CI)
    python -m bench.decoding --strict               # exit 1 when exact ≠ eager or graph ≠ static

Every mode loads the same random-weight checkpoint (bench.throughput.measure.checkpoint_dir), is
warmed up (on CUDA in graph mode: the CUDA-graph capture of every bucket up to the largest batch,
timed and printed) and then generates ``--duration`` seconds per row at each batch size, seeded.
Per mode and batch it prints:

- ms per decoding step: the time between the first and the last progress report of the call
  divided by the steps between them (decode loop only: no prefill, no EnCodec decode);
- audio-s/s: seconds of audio per wall second of the whole call (``StemEngine.generate``);
- the call's wall time (for batch 3: the model time of one 3-stem request);
- peak memory: CUDA ``max_memory_allocated`` on CUDA, the process's peak RSS on CPU;
- token agreement with eager on a fixed prompt set (same seed, ``MusicGen.generate(...,
  return_tokens=True)``) and, where the precision differs from eager's, the mean log-likelihood
  of eager's tokens under both models (teacher-forced, ``LMModel.compute_predictions``).

On CUDA also: CUDA kernels per step and the GPU's busy share of a step (torch.profiler over a
short batch-1 generation).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time


PROMPTS = ["funky electric guitar riff, clean tone", "deep electric bass line, tight groove",
           "acoustic drum kit, steady rock beat", "warm electric piano chords"]


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench.decoding", description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=("tiny", "small", "medium"), default="small")
    p.add_argument("--device", default="auto")
    p.add_argument("--duration", type=float, default=10.0, help="seconds per row (10)")
    p.add_argument("--batches", default="1,3,24,64", help="batch sizes (1,3,24,64)")
    p.add_argument("--modes", default=None,
                   help="engine modes (default: eager,exact,static on CPU; eager,static,graph on CUDA)")
    p.add_argument("--precisions", default=None,
                   help="ENGINE_PRECISION values (default: float32,bfloat16,int8 on CPU; float16,bfloat16 on CUDA)")
    p.add_argument("--profile", action="store_true", help="on CPU, the top ops of a batch-1 call")
    p.add_argument("--rounds", type=int, default=1, help="alternating timing rounds (median)")
    p.add_argument("--quick", action="store_true", help="tiny model, 1 s, batches 1,3, every precision")
    p.add_argument("--strict", action="store_true",
                   help="exit 1 when exact ≠ eager or graph ≠ static (tokens, bitwise, same precision)")
    args = p.parse_args(argv)
    if args.quick:
        args.model, args.duration, args.batches = "tiny", 1.0, "1,3"
        args.strict = True
    return args


def _predictions(engine, tokens):
    """Teacher-forced logits ``[B, K, T, card]`` (float32) and mask of ``tokens`` under the
    engine's language model and precision (``LMModel.compute_predictions``)."""
    torch = engine._torch
    model = engine._model
    attributes, _ = model._prepare_tokens_and_attributes(PROMPTS, None)
    with torch.inference_mode(), model.autocast:
        out = model.lm.compute_predictions(tokens, attributes)
    return out.logits.float(), out.mask


def _peak_memory(torch, device: str) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB (CUDA allocated)"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB (process RSS)"


def _rss_gib() -> float:
    """The process's resident memory now (GiB, /proc/self/statm)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**30


def _timed(engine, rows: int, duration: float, seed: int = 0):
    """(wall seconds, ms per decode step) of one seeded call of ``rows`` rows."""
    stamps = []
    prompts = (PROMPTS * (rows // len(PROMPTS) + 1))[:rows]
    engine._torch.cuda.synchronize() if engine.device.startswith("cuda") else None
    started = time.perf_counter()
    engine.generate(prompts, duration, seed=seed, progress=lambda f: stamps.append((time.perf_counter(), f)))
    wall = time.perf_counter() - started
    steps = (stamps[-2][1] - stamps[0][1]) * duration * 50 if len(stamps) > 2 else 0
    per_step = (stamps[-2][0] - stamps[0][0]) / steps * 1000 if steps else float("nan")
    return wall, per_step


def _tokens(engine, duration: float, seed: int = 0):
    torch = engine._torch
    model = engine._model
    model.set_generation_params(duration=duration)
    torch.manual_seed(seed)
    with torch.inference_mode():
        _, tokens = model.generate(PROMPTS, return_tokens=True)
    return tokens


def _log_likelihood(engine, tokens) -> float:
    """Mean log-probability of ``tokens`` ``[B, K, T]`` under the engine's language model."""
    torch = engine._torch
    model = engine._model
    attributes, _ = model._prepare_tokens_and_attributes(PROMPTS, None)
    with torch.inference_mode(), model.autocast:
        out = model.lm.compute_predictions(tokens, attributes)
    logp = torch.log_softmax(out.logits.float(), dim=-1)
    picked = logp.gather(-1, tokens.clamp(min=0)[..., None])[..., 0]
    return float(picked[out.mask].mean())


def _profile_step(engine, torch) -> str:
    from torch.profiler import ProfilerActivity, profile

    steps = 20
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        torch.cuda.synchronize()
        started = time.perf_counter()
        engine.generate(PROMPTS[:1], steps / 50, seed=0)
        torch.cuda.synchronize()
        wall = time.perf_counter() - started
    kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
    busy = sum(e.device_time for e in kernels) / 1e6  # microseconds -> seconds
    return (f"{len(kernels) / steps:.0f} CUDA kernels per step, GPU busy {100 * busy / wall:.1f}% "
            f"of the call ({steps} steps incl. prefill and EnCodec decode)")


def _profile_cpu(engine, torch, top: int = 8) -> str:
    """The ops that take a batch-1 generation's CPU time (torch.profiler, self time, 20 steps
    including the prefill and EnCodec decode)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        engine.generate(PROMPTS[:1], 20 / 50, seed=0)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1
    return "profile (self CPU): " + ", ".join(
        f"{e.key} {100 * e.self_cpu_time_total / total:.0f}%" for e in events[:top])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    import torch

    from bench.throughput.measure import checkpoint_dir
    from stems.decoding import batch_buckets
    from stems.engine import StemEngine, resolve_device

    device = resolve_device(args.device)
    cuda = device.startswith("cuda")
    batches = [int(b) for b in args.batches.split(",")]
    modes = (args.modes.split(",") if args.modes
             else ["eager", "static", "graph"] if cuda else ["eager", "exact", "static"])
    precisions = (args.precisions.split(",") if args.precisions
                  else ["float16", "bfloat16"] if cuda else ["float32", "bfloat16", "int8"])
    if "float32" not in precisions:
        precisions.insert(0, "float32")
    runs = [("eager", "float32")] + [(m, p) for p in precisions for m in modes
                                     if (m, p) != ("eager", "float32")]
    failures = []
    source = "tiny" if args.model == "tiny" else str(checkpoint_dir(args.model))
    print(f"bench.decoding: musicgen-{args.model} architecture (random weights) on {device}, "
          f"torch {torch.__version__}, {args.duration:g} s per row, batches {batches}")
    engines = {}
    for mode, precision in runs:
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        rss = _rss_gib()
        started = time.perf_counter()
        try:
            engine = StemEngine(source, device=device, mode=mode, precision=precision,
                                buckets=batch_buckets(max(batches)))
        except ValueError as exc:
            print(f"[{mode} {precision}] refused: {exc}")
            continue
        loaded = time.perf_counter() - started
        captured = engine.warm_up(batch_size=max(batches) if mode == "graph" else 1)
        print(f"[{mode} {precision}] load {loaded:.1f} s, CUDA graph capture {captured:.1f} s "
              f"({engine.decoder.stats.graphs if engine.decoder else 0} graphs), "
              f"{_peak_memory(torch, device) if cuda else f'RSS +{_rss_gib() - rss:.2f} GiB'}")
        engines[(mode, precision)] = engine
    # timing: the engines alternate within each round, so a shared box's load falls on all alike
    print(f"\nms per decoding step, median of {args.rounds} alternating round(s); ratio: float32 eager / this")
    for rows in batches:
        times = {key: [] for key in engines}
        walls = {key: [] for key in engines}
        for _ in range(args.rounds):
            for key, engine in engines.items():
                wall, per_step = _timed(engine, rows, args.duration)
                times[key].append(per_step)
                walls[key].append(wall)
        base = statistics.median(times[("eager", "float32")])
        for (mode, precision), values in times.items():
            step = statistics.median(values)
            wall = statistics.median(walls[(mode, precision)])
            print(f"  batch {rows:>3} {mode:>6} {precision:>8}: {step:8.2f} ms/step ({base / step:5.2f}x)"
                  f"  {rows * args.duration / wall:7.2f} audio-s/s  call {wall:7.2f} s"
                  f"  [{', '.join(f'{v:.1f}' for v in values)}]")
    baseline = None  # (logits, mask, log-likelihood) of float32 eager
    eager_tokens = {}
    print()
    for (mode, precision), engine in engines.items():
        print(f"[{mode} {precision}]")
        if cuda:
            print(f"  {_profile_step(engine, torch)}")
        elif args.profile:
            print(f"  {_profile_cpu(engine, torch)}")
        tokens = _tokens(engine, min(args.duration, 5.0))
        if mode == "eager":
            eager_tokens[precision] = tokens
        elif precision in eager_tokens:
            same = bool(torch.equal(tokens, eager_tokens[precision]))
            print(f"  tokens equal to eager {precision}: {same}")
            if mode == "exact" and not same:
                failures.append(f"exact ≠ eager at {precision}")
        if mode == "graph":
            engine.decoder.graphs = False
            uncaptured = _tokens(engine, min(args.duration, 5.0))
            engine.decoder.graphs = True
            same = bool(torch.equal(tokens, uncaptured))
            print(f"  graph tokens equal to the uncaptured static step: {same}")
            if not same:
                failures.append(f"graph ≠ static at {precision}")
        logits, mask = _predictions(engine, eager_tokens["float32"])
        ll = _log_likelihood(engine, eager_tokens["float32"])
        if baseline is None:
            baseline = (logits, mask, ll)
        else:
            error = float(torch.linalg.vector_norm((logits - baseline[0])[mask])
                          / torch.linalg.vector_norm(baseline[0][mask]))
            forced = float((logits.argmax(-1) == baseline[0].argmax(-1))[mask].float().mean())
            free = float((tokens == eager_tokens["float32"]).float().mean())
            print(f"  against float32 eager: logit relative error {error:.2e}, teacher-forced token "
                  f"agreement {100 * forced:.2f}%, free-running token agreement {100 * free:.2f}%, "
                  f"log-likelihood of its tokens {ll:.4f} vs {baseline[2]:.4f} (gap {ll - baseline[2]:+.4f})")
    if failures:
        print("\nFAILED: " + "; ".join(failures))
        return 1 if args.strict else 0
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
