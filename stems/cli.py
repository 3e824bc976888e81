"""``stemgen`` command line: local generation (no broker), tempo conform, tiny checkpoints.

    stemgen generate --stems guitar,bass --bpm 120 --duration 8 [--key "A minor"] [--chords Am,F,C,G] --out DIR
    stemgen conform IN.wav OUT.wav --bpm 120 [--bars 4] [--loop] [--json]
    stemgen key FILE
    stemgen make-tiny-checkpoint DIR
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from stemgen_settings import STEM_NAMES


def _stems(value: str) -> list[str]:
    stems = [s.strip() for s in value.split(",") if s.strip()]
    unknown = [s for s in stems if s not in STEM_NAMES]
    if not stems or unknown:
        raise argparse.ArgumentTypeError(f"stems must be a comma-separated subset of {','.join(STEM_NAMES)}")
    return list(dict.fromkeys(stems))


def _positive(value: str) -> float:
    number = float(value)
    if not number > 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return number


def cmd_generate(args: argparse.Namespace) -> int:
    from stemgen_settings import load_settings
    from stems.analysis import stem_analysis
    from stems.cli_progress import StemProgress
    from stems.engine import AudioConditioning, SamplingParams, StemEngine
    from stems.plan import PlanError, bars_for, make_plan, render_chords
    from stems.prompts import HARMONIC_STEMS, build_stem_prompt
    from stems.render import render_stem

    settings = load_settings()
    try:
        plan = make_plan(bpm=args.bpm, bars=bars_for(args.duration, args.bpm, settings.beats_per_bar),
                         beats_per_bar=settings.beats_per_bar, key=args.key, chords=args.chords,
                         style=args.style, seed=args.seed, salt="cli")
    except PlanError as exc:
        print(f"stemgen generate: {exc}", file=sys.stderr)
        return 2
    model = args.model or settings.musicgen_model
    engine = StemEngine(model, args.device or settings.stemgen_device)
    prompts = [build_stem_prompt(s, args.bpm, style=args.style, prompt=args.prompt,
                                 harmony=plan.prompt_text()) for s in args.stems]
    sampling = SamplingParams(settings.default_top_k, settings.default_top_p,
                              settings.default_temperature, settings.default_cfg_coef)
    length = args.duration + settings.generation_margin_seconds
    # a melody model follows the plan's chords rendered as audio (harmonic stems only)
    chroma = (AudioConditioning("chroma", render_chords(plan, engine.sample_rate), engine.sample_rate,
                                "plan") if engine.supports_melody else None)
    started = time.perf_counter()
    audio = [None] * len(args.stems)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # progress on stderr (stdout carries the report): bars on a terminal, else a line per stem
    with StemProgress(args.stems, int(length * engine.frame_rate), args.duration, sys.stderr) as shown:
        for harmonic in (True, False):
            rows = [i for i, s in enumerate(args.stems) if (s in HARMONIC_STEMS) == harmonic]
            if rows:
                names = [args.stems[i] for i in rows]
                clips = engine.generate([prompts[i] for i in rows], length, sampling=sampling,
                                        seed=args.seed, conditioning=chroma if harmonic else None,
                                        progress=lambda fraction, names=names: shown.advance(names, fraction))
                for i, clip in zip(rows, clips):
                    audio[i] = clip
        generated = time.perf_counter() - started
        report = {"model": model, "device": engine.device, "generation_seconds": round(generated, 3),
                  "plan": plan.to_dict(), "stems": []}
        for stem, prompt, clip in zip(args.stems, prompts, audio):
            rendered = render_stem(clip, engine.sample_rate, bpm=args.bpm, duration_seconds=args.duration,
                                   beats_per_bar=settings.beats_per_bar, loop=args.loop,
                                   target_lufs=settings.target_lufs,
                                   max_true_peak_dbtp=settings.max_true_peak_dbtp)
            path = out / f"{stem}.wav"
            path.write_bytes(rendered.data)
            report["stems"].append({"stem": stem, "path": str(path), "prompt": prompt, **rendered.metadata(),
                                    "analysis": stem_analysis(rendered.audio, rendered.sample_rate, plan,
                                                              harmonic=stem in HARMONIC_STEMS)})
            shown.done(stem, str(path))
    print(json.dumps(report, indent=2))
    return 0


def cmd_conform(args: argparse.Namespace) -> int:
    import soundfile

    from stems.tempo import TempoError, conform_file

    try:
        analysis = conform_file(args.input, args.output, args.bpm, bars=args.bars, loop=args.loop)
    except (TempoError, OSError, soundfile.SoundFileError) as exc:
        print(f"stemgen conform: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(analysis, indent=2))
    else:
        print(f"{args.output}: {analysis['bars']} bars at {analysis['target_bpm']:g} BPM "
              f"(source {analysis['source_bpm']:.2f} BPM, confidence {analysis['confidence']:.2f}, "
              f"{analysis['method']})")
    return 0


def cmd_key(args: argparse.Namespace) -> int:
    import soundfile

    from stems.analysis import AnalysisError, estimate_key

    try:
        audio, rate = soundfile.read(args.input, dtype="float32", always_2d=True)
        estimate = estimate_key(audio.T, rate)
    except (AnalysisError, OSError, soundfile.SoundFileError) as exc:
        print(f"stemgen key: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(estimate.to_dict()))
    return 0


def cmd_make_tiny_checkpoint(args: argparse.Namespace) -> int:
    from stems.checkpoint import write_checkpoint

    path = write_checkpoint(args.dir, args.scale, seed=args.seed, melody=args.melody)
    print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stemgen", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate stems locally (no broker, no storage)")
    gen.add_argument("--stems", type=_stems, default=list(STEM_NAMES))
    gen.add_argument("--bpm", type=_positive, required=True)
    gen.add_argument("--duration", type=_positive, default=8.0, help="seconds")
    gen.add_argument("--style")
    gen.add_argument("--prompt")
    gen.add_argument("--key", help='e.g. "A minor" (default: from --chords, or drawn from the seed)')
    gen.add_argument("--chords", type=lambda v: [c.strip() for c in v.split(",") if c.strip()],
                     help="one chord per bar, comma-separated, e.g. Am,F,C,G")
    gen.add_argument("--seed", type=int)
    gen.add_argument("--loop", action="store_true")
    gen.add_argument("--model", help="hub id, checkpoint dir or 'tiny' (default: $MUSICGEN_MODEL)")
    gen.add_argument("--device", help="auto, cpu, cuda (default: $STEMGEN_DEVICE)")
    gen.add_argument("--out", required=True, help="output directory")
    gen.set_defaults(func=cmd_generate)

    con = sub.add_parser("conform", help="conform an audio file to a BPM in whole bars")
    con.add_argument("input")
    con.add_argument("output")
    con.add_argument("--bpm", type=_positive, required=True)
    con.add_argument("--bars", type=int)
    con.add_argument("--loop", action="store_true")
    con.add_argument("--json", action="store_true", help="print the analysis as JSON")
    con.set_defaults(func=cmd_conform)

    key = sub.add_parser("key", help="estimate the key of an audio file (Krumhansl-Schmuckler)")
    key.add_argument("input")
    key.set_defaults(func=cmd_key)

    tiny = sub.add_parser("make-tiny-checkpoint",
                          help="write a random-weight MusicGen that MusicGen.get_pretrained(DIR) loads")
    tiny.add_argument("dir")
    tiny.add_argument("--scale", choices=["tiny", "small", "medium"], default="tiny")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--melody", action="store_true", help="a melody-conditioned (chroma) model")
    tiny.set_defaults(func=cmd_make_tiny_checkpoint)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
