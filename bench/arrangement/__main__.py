"""What each arrangement costs: independent stems (one batched MusicGen call, one conform per
stem) against an ensemble (one generation, one conform of the mix, Demucs separation), on the
same engine and the same seed, in one run.

    python -m bench.arrangement                  # musicgen-small architecture, released-size HTDemucs
    python -m bench.arrangement --scale tiny --seconds 4     # smoke run

Weights are random (none can be downloaded here): the cost of a generation or a separation does
not depend on the weights' values, only on the architecture and the audio length. The numbers say
nothing about musical quality; the key columns only show that the analysis runs on both paths.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

STEMS = ("guitar", "bass", "drums")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.arrangement", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", choices=("tiny", "small", "medium"), default="small",
                        help="MusicGen architecture (random weights); default small")
    parser.add_argument("--seconds", type=float, default=10.0, help="stem length, seconds")
    parser.add_argument("--bpm", type=float, default=120.0)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="torch threads for generation and separation")
    parser.add_argument("--tiny-demucs", action="store_true",
                        help="separate with the tiny HTDemucs instead of the released size")
    args = parser.parse_args(argv)
    os.environ.setdefault("USER", "stemgen")

    import torch

    from stems.analysis import stem_analysis
    from stems.checkpoint import torch_home_environment, write_checkpoint, write_tiny_demucs
    from stems.engine import StemEngine
    from stems.plan import make_plan
    from stems.prompts import HARMONIC_STEMS, build_ensemble_prompt, build_stem_prompt
    from stems.render import bars_for, conform_clip, finish_stem, render_stem
    from stems.render import warm_up as render_warm_up
    from stems.separation import Separator

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench-arrangement-"))
    plan = make_plan(bpm=args.bpm, bars=bars_for(args.seconds, args.bpm), key="A minor",
                     style="rock", seed=1)
    print(f"# bench.arrangement: musicgen-{args.scale} architecture, {args.seconds:g} s stems at "
          f"{args.bpm:g} BPM, {args.threads} torch threads, plan {plan.key.name} "
          f"{' '.join(plan.progression)}")
    engine = StemEngine(str(write_checkpoint(work / "musicgen", args.scale)), "cpu",
                        num_threads=args.threads)
    engine.warm_up()
    render_warm_up(engine.sample_rate)  # librosa's lazy imports and numba, as a worker does at start
    write_tiny_demucs(work / "torch", "htdemucs_6s", released_size=not args.tiny_demucs,
                      segment_seconds=7.8)
    with torch_home_environment(work / "torch"):
        separator = Separator("htdemucs_6s", "cpu", num_threads=args.threads)
    rate, length = engine.sample_rate, args.seconds + 1.0  # + GENERATION_MARGIN_SECONDS
    harmony = plan.prompt_text()

    # independent: the worker path, one batched call for the three stems
    started = time.perf_counter()
    clips = engine.generate([build_stem_prompt(s, plan.bpm, style="rock", harmony=harmony)
                             for s in STEMS], length, seed=7)
    independent_model = time.perf_counter() - started
    started = time.perf_counter()
    rendered = {s: render_stem(clip, rate, bpm=plan.bpm, duration_seconds=args.seconds)
                for s, clip in zip(STEMS, clips)}
    independent_render = time.perf_counter() - started
    started = time.perf_counter()
    for s, r in rendered.items():
        stem_analysis(r.audio, rate, plan, harmonic=s in HARMONIC_STEMS)
    analysis_seconds = time.perf_counter() - started

    # ensemble: one generation, one conform, separation, loudness per stem
    started = time.perf_counter()
    mix = engine.generate([build_ensemble_prompt(list(STEMS), plan.bpm, style="rock",
                                                 harmony=harmony)], length, seed=7)[0]
    ensemble_model = time.perf_counter() - started
    started = time.perf_counter()
    conformed = conform_clip(mix, rate, bpm=plan.bpm, duration_seconds=args.seconds)
    conform_seconds = time.perf_counter() - started
    started = time.perf_counter()
    parts = separator.separate(conformed.audio, rate, STEMS)
    separation = time.perf_counter() - started
    started = time.perf_counter()
    finished = {s: finish_stem(parts[s], rate, conformed.analysis) for s in STEMS}
    finish_seconds = time.perf_counter() - started
    lengths = {r.audio.shape[1] for r in finished.values()}

    audio_seconds = len(STEMS) * args.seconds
    independent = independent_model + independent_render
    ensemble = ensemble_model + conform_seconds + separation + finish_seconds
    print("| arrangement | MusicGen | conform + loudness | separation | total | stem-audio s per s |")
    print("|---|---|---|---|---|---|")
    print(f"| independent (batch of {len(STEMS)}) | {independent_model:.2f} s | "
          f"{independent_render:.2f} s | - | {independent:.2f} s | {audio_seconds / independent:.3f} |")
    print(f"| ensemble (batch of 1) | {ensemble_model:.2f} s | {conform_seconds + finish_seconds:.2f} s "
          f"| {separation:.2f} s ({'tiny' if args.tiny_demucs else 'released-size'} htdemucs_6s) | "
          f"{ensemble:.2f} s | {audio_seconds / ensemble:.3f} |")
    print(f"ensemble_over_independent={ensemble / independent:.2f}")
    print(f"ensemble stems sample-aligned: {len(lengths) == 1} ({sorted(lengths)} samples)")
    print(f"key and chord analysis of the {len(STEMS)} stems (both paths): {analysis_seconds:.2f} s")
    print(f"peak RSS: {_peak_rss_mib():.0f} MiB")
    return 0


def _peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


if __name__ == "__main__":
    raise SystemExit(main())
