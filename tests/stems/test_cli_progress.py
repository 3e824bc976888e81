"""stemgen generate's progress: bars per stem on a terminal, one line per stem otherwise."""

import io

from stems.cli_progress import StemProgress


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_without_a_terminal_one_line_per_stem_when_done():
    out = io.StringIO()
    with StemProgress(["guitar", "bass", "drums"], 400, 8.0, out) as shown:
        shown.advance(["guitar", "bass"], 0.5)
        shown.advance(["guitar", "bass"], 1.0)
        assert out.getvalue() == ""  # nothing while generating
        shown.advance(["drums"], 1.0)
        for stem in ("guitar", "bass", "drums"):
            shown.done(stem, f"/out/{stem}.wav")
    lines = out.getvalue().splitlines()
    assert [line.split(":")[0] for line in lines] == ["guitar", "bass", "drums"]
    assert lines[0].startswith("guitar: done, 8 s audio, 400 steps, ")
    assert lines[0].endswith(", /out/guitar.wav")


def test_on_a_terminal_a_bar_per_stem_with_steps_audio_seconds_and_time_left():
    out = Terminal()
    with StemProgress(["guitar", "drums"], 400, 8.0, out) as shown:
        shown.advance(["guitar"], 0.25)
        shown.advance(["guitar"], 0.2)  # never backwards
        assert shown.steps == {"guitar": 100, "drums": 0}
        assert shown.bars["guitar"].n == 100
        assert "0/400 steps, 0.0/8 s audio" in out.getvalue()  # drawn at the start
        shown.bars["guitar"].refresh()  # tqdm redraws at most every 0.1 s by itself
        text = out.getvalue()
        assert "100/400 steps, 2.0/8 s audio" in text
        assert "<" in text  # elapsed<remaining
        shown.done("guitar")
        assert shown.bars["guitar"].n == 400
    assert "done," not in out.getvalue()


def test_bars_on_a_real_terminal_even_one_that_reports_no_size():
    """A pty without a window size (0 x 0, as under some CI runners and `script`): bars still show."""
    import os
    import pty
    import subprocess
    import sys

    from tests.harness import ROOT

    code = ("import sys\nfrom stems.cli_progress import StemProgress\n"
            "with StemProgress(['guitar', 'drums'], 100, 2.0, sys.stderr) as p:\n"
            "    p.advance(['guitar', 'drums'], 0.5)\n    p.done('guitar')\n    p.done('drums')\n")
    master, slave = pty.openpty()
    child = subprocess.Popen([sys.executable, "-c", code], stdin=slave, stdout=slave, stderr=slave,
                             cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    os.close(slave)
    out = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    assert child.wait(timeout=60) == 0, out
    text = out.decode()
    assert " guitar 100%|" in text and "  drums 100%|" in text
    assert "100/100 steps, 2.0/2 s audio" in text
    assert "done," not in text
