"""The stemgen command line, run as a user runs it (a subprocess of the installed console script)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import soundfile as sf

STEMGEN = str(Path(sys.executable).parent / "stemgen")


def run(*args, **kwargs):
    return subprocess.run([STEMGEN, *args], capture_output=True, text=True, timeout=300, **kwargs)


def click_track(path: Path, bpm: float, seconds: float, rate: int = 44100) -> None:
    t = np.arange(int(seconds * rate)) / rate
    audio = np.zeros_like(t)
    for beat in np.arange(0, seconds, 60.0 / bpm):
        i = int(beat * rate)
        n = min(2000, len(t) - i)
        audio[i:i + n] += np.sin(2 * np.pi * 1000 * t[:n]) * np.exp(-t[:n] * 60)
    sf.write(path, audio.astype(np.float32) * 0.5, rate)


def test_generate_with_tiny_model(tmp_path):
    result = run("generate", "--stems", "guitar,bass", "--bpm", "120", "--duration", "4",
                 "--model", "tiny", "--device", "cpu", "--seed", "1", "--out", str(tmp_path / "out"),
                 env={**__import__("os").environ, "STEMGEN_CACHE_DIR": str(tmp_path / "cache")})
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert [s["stem"] for s in report["stems"]] == ["guitar", "bass"]
    # not a terminal: one progress line per stem, and nothing else (no warnings at start, on a
    # fresh cache where the tiny checkpoint is written first)
    lines = result.stderr.splitlines()
    assert [line.split(": done, ")[0] for line in lines] == ["guitar", "bass"], result.stderr
    assert lines[1].endswith(str(tmp_path / "out" / "bass.wav"))
    for stem in report["stems"]:
        audio, rate = sf.read(stem["path"])
        assert rate == 32000
        assert len(audio) == 2 * 4 * 60 / 120 * 32000  # 2 bars of 4/4 at 120 BPM
        assert stem["tempo"]["bars"] == 2


def test_conform_json(tmp_path):
    src, dst = tmp_path / "in.wav", tmp_path / "out.wav"
    click_track(src, 100, 10)
    result = run("conform", str(src), str(dst), "--bpm", "120", "--json")
    assert result.returncode == 0, result.stderr
    analysis = json.loads(result.stdout)
    assert analysis["target_bpm"] == 120
    assert abs(analysis["source_bpm"] - 100) < 1
    audio, rate = sf.read(dst)
    assert rate == 44100
    assert len(audio) == round(analysis["bars"] * 4 * 0.5 * 44100)


def test_conform_bad_input_is_a_clear_error(tmp_path):
    src = tmp_path / "short.wav"
    sf.write(src, np.zeros(100, dtype=np.float32), 32000)
    result = run("conform", str(src), str(tmp_path / "o.wav"), "--bpm", "120")
    assert result.returncode == 2
    assert "stemgen conform:" in result.stderr
    assert "Traceback" not in result.stderr


def test_conform_missing_file(tmp_path):
    result = run("conform", str(tmp_path / "nope.wav"), str(tmp_path / "o.wav"), "--bpm", "120")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr


def test_usage_errors():
    assert run("generate", "--stems", "piano", "--bpm", "120", "--out", "x").returncode == 2
    assert run("conform", "a", "b", "--bpm", "-3").returncode == 2


def test_make_tiny_checkpoint(tmp_path):
    result = run("make-tiny-checkpoint", str(tmp_path / "ck"))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "ck" / "state_dict.bin").is_file()
    assert (tmp_path / "ck" / "compression_state_dict.bin").is_file()


def test_generate_follows_a_plan_with_the_tiny_melody_model(tmp_path):
    result = run("generate", "--stems", "bass,drums", "--bpm", "100", "--duration", "4.8",
                 "--chords", "Dm,Bb,F,C", "--model", "tiny-melody", "--device", "cpu", "--seed", "2",
                 "--out", str(tmp_path / "out"),
                 env={**__import__("os").environ, "STEMGEN_CACHE_DIR": str(tmp_path / "cache")})
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["plan"]["key"] == "D minor" and report["plan"]["chords"] == ["Dm", "A#"]  # sharps
    stems = {s["stem"]: s for s in report["stems"]}
    assert "chord progression Dm A# F C" in stems["bass"]["prompt"]
    assert stems["bass"]["analysis"]["harmonic"] and not stems["drums"]["analysis"]["harmonic"]
    bad = run("generate", "--bpm", "100", "--key", "H minor", "--model", "tiny", "--out", str(tmp_path))
    assert bad.returncode == 2 and "H minor" in bad.stderr


def test_key_of_a_file(tmp_path):
    rate = 22050
    t = np.arange(rate * 4) / rate
    # E major triad then B major: E major
    triad = lambda *hz: sum(np.sin(2 * np.pi * f * t[: rate * 2]) for f in hz)  # noqa: E731
    audio = np.concatenate([triad(164.8, 207.7, 246.9), triad(123.5, 155.6, 185.0)]) * 0.2
    sf.write(tmp_path / "e.wav", audio.astype(np.float32), rate)
    result = run("key", str(tmp_path / "e.wav"))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["key"] == "E major"
    assert run("key", str(tmp_path / "missing.wav")).returncode == 2
