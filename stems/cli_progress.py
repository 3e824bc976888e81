"""``stemgen generate``'s progress: one tqdm bar per stem on a terminal (decoding steps done of the
total, seconds of audio, time left), one line per stem when it is done otherwise (a log, a pipe).

The engine reports the fraction of decoding steps done per batched call (StemEngine.generate's
``progress``); the stems of one call advance together.
"""

from __future__ import annotations

import shutil
import time
from typing import TextIO

from tqdm import tqdm

#: The bar: stem, bar, steps done/total, audio seconds, elapsed and time left.
BAR_FORMAT = ("{desc:>7} {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} steps{postfix} "
              "[{elapsed}<{remaining}]")


class StemProgress:
    """Progress of the stems of one ``stemgen generate``.

    Args:
        stems: the stems, in order.
        total_steps: decoding steps per stem (seconds generated × the model's frame rate, Hz).
        audio_seconds: seconds of audio each stem will have.
        stream: where progress goes (stderr: stdout carries the JSON report).
        tty: draw bars; default: whether ``stream`` is a terminal.
    """

    def __init__(self, stems: list[str], total_steps: int, audio_seconds: float, stream: TextIO,
                 tty: bool | None = None):
        self.stems = list(stems)
        self.total_steps = max(1, int(total_steps))
        self.audio_seconds = audio_seconds
        self.stream = stream
        self.tty = stream.isatty() if tty is None else tty
        self.started = time.perf_counter()
        self.steps = {stem: 0 for stem in self.stems}
        self.bars: dict[str, tqdm] = {}
        if self.tty:
            # a terminal that reports no size (0 x 0) gets 100 x 24: tqdm would draw nothing
            size = shutil.get_terminal_size(fallback=(100, 24))
            for position, stem in enumerate(self.stems):
                self.bars[stem] = tqdm(total=self.total_steps, desc=stem, position=position,
                                       file=stream, bar_format=BAR_FORMAT, ncols=size.columns,
                                       nrows=max(size.lines, len(self.stems) + 1),
                                       leave=True, postfix=self._audio(0))

    def _audio(self, steps: int) -> str:
        return f"{self.audio_seconds * steps / self.total_steps:.1f}/{self.audio_seconds:g} s audio"

    def advance(self, stems: list[str], fraction: float) -> None:
        """The stems of one batched call have ``fraction`` (0..1) of their steps decoded."""
        steps = min(self.total_steps, int(round(fraction * self.total_steps)))
        for stem in stems:
            done = steps - self.steps[stem]
            if done <= 0:
                continue
            self.steps[stem] = steps
            bar = self.bars.get(stem)
            if bar is not None:
                bar.set_postfix_str(self._audio(steps), refresh=False)
                bar.update(done)

    def done(self, stem: str, detail: str = "") -> None:
        """``stem`` is finished (generated, conformed, written): on a terminal its bar is full; else
        one line says so."""
        self.advance([stem], 1.0)
        elapsed = time.perf_counter() - self.started
        if self.tty:
            self.bars[stem].set_description_str(stem, refresh=True)
            return
        line = f"{stem}: done, {self.audio_seconds:g} s audio, {self.total_steps} steps, {elapsed:.1f} s"
        print(f"{line}{', ' + detail if detail else ''}", file=self.stream, flush=True)

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()

    def __enter__(self) -> "StemProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
