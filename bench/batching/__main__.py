"""A mixed-duration queue through the batcher: do short stems wait behind long ones?

    python -m bench.batching              # tiny model: 3 long (--long s) and 3 short (--short s) stems
    python -m bench.batching --model small --long 10 --short 2

Submits the long stems, then (``--gap`` seconds later, while the first round collects) the short
ones, all at once from threads as a worker's task threads do, and prints each stem's latency
(submit to clip) under the two orders of stems.batching.StemBatcher: "arrival" (a round's calls in
the order their first request arrived) and "shortest" (shortest calls first, the default).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time


def run(engine, order: str, long_s: float, short_s: float, gap: float, window: float) -> dict:
    from stems.batching import StemBatcher

    batcher = StemBatcher(engine, max_batch=4, window_seconds=window, order=order)
    latency: dict[str, list[float]] = {"long": [], "short": []}

    def one(kind: str, prompt: str, seconds: float) -> None:
        started = time.perf_counter()
        batcher.generate(prompt, seconds, seed=1)
        latency[kind].append(time.perf_counter() - started)

    threads = [threading.Thread(target=one, args=("long", f"long {i}", long_s)) for i in range(3)]
    for t in threads:
        t.start()
    time.sleep(gap)
    shorts = [threading.Thread(target=one, args=("short", f"short {i}", short_s)) for i in range(3)]
    for t in shorts:
        t.start()
    for t in threads + shorts:
        t.join()
    return latency


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.batching", description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=("tiny", "small"), default="tiny")
    p.add_argument("--long", type=float, default=60.0, help="seconds of each long stem (60)")
    p.add_argument("--short", type=float, default=4.0, help="seconds of each short stem (4)")
    p.add_argument("--gap", type=float, default=0.05, help="seconds between the long and short submits")
    p.add_argument("--window", type=float, default=0.5, help="BATCH_WINDOW_SECONDS (0.5)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    from bench.throughput.measure import checkpoint_dir
    from stems.engine import StemEngine

    engine = StemEngine("tiny" if args.model == "tiny" else str(checkpoint_dir(args.model)), device="cpu")
    engine.warm_up()
    print(f"bench.batching: musicgen-{args.model} architecture on cpu; 3 × {args.long:g} s then 3 × "
          f"{args.short:g} s stems, {args.gap:g} s apart; window {args.window:g} s, max batch 4")
    for order in ("arrival", "shortest", "arrival", "shortest"):
        latency = run(engine, order, args.long, args.short, args.gap, args.window)
        print(f"  {order:>8}: short stems {statistics.median(latency['short']):6.2f} s median "
              f"(max {max(latency['short']):6.2f}), long stems {statistics.median(latency['long']):6.2f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
