"""stems.plan: parsing, key inference, the style table, reproducible plans, the chord render.

Expected keys and chord tones are written from music theory here, not taken from the code.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from stems.analysis import estimate_key
from stems.plan import (
    PITCH_CLASSES,
    STYLE_PROGRESSIONS,
    InvalidChordName,
    InvalidKeyName,
    Key,
    MusicalPlan,
    PlanError,
    infer_key,
    make_plan,
    match_style,
    parse_chord,
    parse_key,
    progression_in_key,
    render_chords,
)

SR = 32000


def pcs(*names: str) -> set[int]:
    return {PITCH_CLASSES.index(n) for n in names}


# ------------------------------------------------------------------------------------ parsing

@pytest.mark.parametrize("text, tonic, mode", [
    ("A minor", "A", "minor"), ("a min", "A", "minor"), ("Am", "A", "minor"),
    ("F# major", "F#", "major"), ("Gb major", "F#", "major"), ("Bb", "A#", "major"),
    ("C#m", "C#", "minor"), ("E minor", "E", "minor"), ("  d   MINOR ", "D", "minor"),
    ("eb", "D#", "major"), ("C", "C", "major"), ("Ab-minor", "G#", "minor"), ("B♭ major", "A#", "major"),
])
def test_parse_key(text, tonic, mode):
    key = parse_key(text)
    assert key == Key(PITCH_CLASSES.index(tonic), mode)
    assert key.name == f"{tonic} {mode}"


def test_enharmonic_keys_are_equal():
    assert parse_key("Db major") == parse_key("C# major")
    assert parse_key("Ebm") == parse_key("D# minor")
    assert parse_key("Cb") == parse_key("B")


@pytest.mark.parametrize("text", ["H major", "A dorian", "", "   ", "Am7", "minor", "A minor key", "C##",
                                  5, None])
def test_invalid_key(text):
    with pytest.raises(InvalidKeyName) as err:
        parse_key(text)
    assert err.value.field == "parameters.key"
    assert isinstance(err.value, PlanError) and isinstance(err.value, ValueError)


def test_key_scale():
    assert set(parse_key("A minor").pitch_classes()) == pcs("A", "B", "C", "D", "E", "F", "G")
    assert set(parse_key("D major").pitch_classes()) == pcs("D", "E", "F#", "G", "A", "B", "C#")
    assert parse_key("D major").pitch_classes()[0] == PITCH_CLASSES.index("D")
    assert parse_key("A minor").relative() == parse_key("C major")


@pytest.mark.parametrize("text, name, tones", [
    ("Am", "Am", ("A", "C", "E")),
    ("F", "F", ("F", "A", "C")),
    ("C#m7", "C#m7", ("C#", "E", "G#", "B")),
    ("Gmaj7", "Gmaj7", ("G", "B", "D", "F#")),
    ("Bdim", "Bdim", ("B", "D", "F")),
    ("Esus4", "Esus4", ("E", "A", "B")),
    ("Dsus2", "Dsus2", ("D", "E", "A")),
    ("D5", "D5", ("D", "A")),
    ("A7", "A7", ("A", "C#", "E", "G")),
    ("Ebm", "D#m", ("D#", "F#", "A#")),
    ("Bbmaj7", "A#maj7", ("A#", "D", "F", "A")),
    ("Caug", "Caug", ("C", "E", "G#")),
    ("G-7", "Gm7", ("G", "A#", "D", "F")),
    ("AM7", "Amaj7", ("A", "C#", "E", "G#")),
])
def test_parse_chord(text, name, tones):
    chord = parse_chord(text)
    assert chord.name == name
    assert set(chord.pitch_classes) == pcs(*tones)
    assert chord.pitch_classes[0] == chord.root == PITCH_CLASSES.index(tones[0])
    assert parse_chord(chord.name) == chord   # canonical names parse to themselves


def test_slash_chord():
    chord = parse_chord("C/E")
    assert chord.name == "C/E" and chord.bass == PITCH_CLASSES.index("E")
    assert set(chord.pitch_classes) == pcs("C", "E", "G")
    outside = parse_chord("C/Bb")
    assert outside.bass == PITCH_CLASSES.index("A#") and PITCH_CLASSES.index("A#") in outside.pitch_classes


@pytest.mark.parametrize("text", ["H", "Am/", "C/H", "Cmaj9", "", "Xm", "C/Em", 7])
def test_invalid_chord(text):
    with pytest.raises(InvalidChordName) as err:
        parse_chord(text)
    assert err.value.field == "parameters.chords"


def test_invalid_chord_in_request_names_chord_and_index():
    with pytest.raises(InvalidChordName) as err:
        make_plan(bpm=120, bars=4, chords=["Am", "F", "Q7", "G"])
    assert "'Q7'" in str(err.value) and "index 2" in str(err.value)
    assert err.value.field == "parameters.chords"
    with pytest.raises(InvalidKeyName):
        make_plan(bpm=120, bars=4, key="Z major")


# ------------------------------------------------------------------------------ key inference

@pytest.mark.parametrize("chords, key", [
    (["C", "F", "G", "C"], "C major"),
    (["Am", "F", "C", "G"], "A minor"),     # same notes as C major; starts on Am
    (["C", "G", "Am", "F"], "C major"),
    (["G", "D", "Em", "C"], "G major"),
    (["Em", "C", "G", "D"], "E minor"),
    (["A7", "D7", "E7", "A7"], "A major"),  # blues: dominant sevenths outside the scale
    (["Dm7", "G7", "Cmaj7"], "C major"),    # ii-V-I
    (["E5", "C5", "D5", "E5"], "E minor"),  # power chords: no thirds
    (["Bbm", "Gb", "Db", "Ab"], "A# minor"),
])
def test_infer_key(chords, key):
    assert infer_key([parse_chord(c) for c in chords]) == parse_key(key)


def test_style_tables_start_on_the_tonic_and_imply_their_key():
    for style, table in STYLE_PROGRESSIONS.items():
        for mode, progressions in table.items():
            for numerals in progressions:
                for tonic in range(12):
                    key = Key(tonic, mode)
                    chords = [parse_chord(c) for c in progression_in_key(numerals, key)]
                    assert chords[0].root == tonic, (style, numerals)
                    assert infer_key(chords) == key, (style, numerals, key.name)


def test_roman_numerals():
    assert progression_in_key("I V vi IV", parse_key("C")) == ("C", "G", "Am", "F")
    assert progression_in_key("i VI III VII", parse_key("Am")) == ("Am", "F", "C", "G")
    assert progression_in_key("I7 bVII7 ii° V5", parse_key("D")) == ("D7", "C7", "Edim", "A5")
    assert progression_in_key("ii7 V7 Imaj7", parse_key("Bb")) == ("Cm7", "F7", "A#maj7")


@pytest.mark.parametrize("style, family", [
    ("hard rock, gritty", "rock"), ("blues rock", "rock"), ("dubstep", "electronic"),
    ("smooth jazz", "jazz"), ("jazz funk", "funk"), ("Heavy METAL", "metal"), ("country", "folk"),
    ("neo-soul, warm", "soul"), ("R&B ballad", "soul"), ("roots reggae", "reggae"),
    ("polka", "default"), ("", "default"), (None, "default"), ("dreamy, lo-fi", "electronic"),
])
def test_match_style(style, family):
    assert match_style(style) == family


# -------------------------------------------------------------------------------------- plans

def test_chords_given_without_key():
    plan = make_plan(bpm=100, bars=6, chords=["am", "F", "C", "G"])
    assert plan.key == parse_key("A minor") and plan.source == "request-chords"
    assert plan.progression == ("Am", "F", "C", "G")
    assert plan.chords == ("Am", "F", "C", "G", "Am", "F")
    assert make_plan(bpm=100, bars=3, chords=["Am", "F", "C", "G"]).chords == ("Am", "F", "C")


def test_key_and_chords_given_are_kept():
    plan = make_plan(bpm=100, bars=2, key="E minor", chords=["C", "D"])
    assert plan.key == parse_key("Em") and plan.progression == ("C", "D") and plan.source == "request"


def test_key_given_uses_style_table():
    for seed in range(8):
        plan = make_plan(bpm=120, bars=8, key="D minor", style="hard rock, gritty", seed=seed)
        assert plan.key == parse_key("D minor") and plan.source == "style-table"
        allowed = {progression_in_key(n, plan.key) for n in STYLE_PROGRESSIONS["rock"]["minor"]}
        assert plan.progression in allowed
        assert len(plan.chords) == 8


def test_same_seed_same_plan_different_seeds_differ():
    plans = [make_plan(bpm=120, bars=4, style="pop", seed=s) for s in range(24)]
    assert plans == [make_plan(bpm=120, bars=4, style="pop", seed=s) for s in range(24)]
    assert len({p.key for p in plans}) >= 6
    assert len({p.progression for p in plans}) >= 6
    for p in plans:
        assert p.source == "seed"
        allowed = {progression_in_key(n, p.key) for n in STYLE_PROGRESSIONS["pop"][p.key.mode]}
        assert p.progression in allowed


def test_salt_used_when_no_seed():
    a = make_plan(bpm=120, bars=4, salt="gen-123")
    assert a == make_plan(bpm=120, bars=4, salt="gen-123")
    assert len({make_plan(bpm=120, bars=4, salt=f"gen-{i}").key for i in range(24)}) >= 6
    # a seed overrides the salt
    assert make_plan(bpm=120, bars=4, seed=7, salt="x") == make_plan(bpm=120, bars=4, seed=7, salt="y")


def test_style_sets_mode_bias():
    metal = [make_plan(bpm=120, bars=4, style="metal", seed=s).key.mode for s in range(100)]
    blues = [make_plan(bpm=120, bars=4, style="blues", seed=s).key.mode for s in range(100)]
    assert metal.count("minor") > 65 and blues.count("minor") < 40


def test_plan_is_the_same_in_another_process():
    """hashlib, not hash(): str hashing is salted per process (PYTHONHASHSEED)."""
    code = ("import json; from stems.plan import make_plan; "
            "print(json.dumps([make_plan(bpm=97, bars=4, style='funk', seed=5).to_dict(), "
            "make_plan(bpm=97, bars=4, salt='req-9').to_dict()]))")
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         check=True, cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert json.loads(out.stdout) == [make_plan(bpm=97, bars=4, style="funk", seed=5).to_dict(),
                                      make_plan(bpm=97, bars=4, salt="req-9").to_dict()]


def test_to_dict_round_trip():
    plan = make_plan(bpm=87.5, bars=5, beats_per_bar=3, chords=["Bbmaj7", "C/E", "Dm"], style="jazz")
    d = plan.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert d["key"] == plan.key.name and d["time_signature"] == "3/4" and d["bars"] == 5
    assert d["tonic"] + " " + d["mode"] == d["key"] and len(d["chords"]) == 5
    assert MusicalPlan.from_dict(d) == plan
    with pytest.raises(ValueError):
        MusicalPlan.from_dict({"key": "A minor"})


def test_chords_as_one_string_is_refused():
    with pytest.raises(InvalidChordName, match="list"):
        make_plan(bpm=120, bars=4, chords="Am F C G")


def test_plan_helpers():
    plan = make_plan(bpm=120, bars=4, key="A minor", chords=["Am", "F", "C", "G"])
    assert plan.bar_seconds() == pytest.approx(2.0)
    assert plan.prompt_text() == "in A minor, chord progression Am F C G"
    assert [c.name for c in plan.chord_objects()] == ["Am", "F", "C", "G"]
    with pytest.raises(ValueError):
        MusicalPlan(key=plan.key, progression=("Am",), chords=("Am",), bpm=120, bars=2)
    with pytest.raises(ValueError):
        make_plan(bpm=0, bars=4)


# ------------------------------------------------------------------------------- chord render

def test_render_chords_shape_and_peak():
    plan = make_plan(bpm=120, bars=3, key="C", chords=["C", "G", "Am"])
    audio = render_chords(plan, SR)
    assert audio.shape == (1, int(round(3 * 2.0 * SR))) and audio.dtype == np.float32
    assert 0.5 < np.max(np.abs(audio)) <= 0.9 + 1e-6
    assert np.isfinite(audio).all()
    assert render_chords(plan, SR, seconds=1.25).shape == (1, int(round(1.25 * SR)))
    assert render_chords(plan, SR, seconds=9.0).shape == (1, 9 * SR)   # past the plan: chords repeat


@pytest.mark.parametrize("key, chords", [
    ("A minor", ["Am", "F", "C", "G"]),
    ("F# major", None),
    ("D minor", None),
    ("Eb major", ["Eb", "Ab", "Bb", "Eb"]),
    ("G major", ["G", "Em", "C", "D"]),
])
def test_render_chords_is_heard_in_the_plan_key(key, chords):
    plan = make_plan(bpm=110, bars=4, key=key, chords=chords, seed=3)
    assert estimate_key(render_chords(plan, SR), SR).key == plan.key
