import pytest

from stems.prompts import MAX_TEXT_CHARS, STEM_DESCRIPTIONS, UnknownStemError, build_stem_prompt


def test_prompt_parts_in_order():
    p = build_stem_prompt("bass", 120, style="funk", prompt="slap bass groove")
    assert p == ("funk, solo bass guitar, isolated bass line, no drums, no guitar, no vocals, "
                 "slap bass groove, 120 bpm")


def test_fractional_bpm_and_missing_parts():
    assert build_stem_prompt("drums", 97.5).endswith("97.5 bpm")
    assert build_stem_prompt("drums", 97.5).startswith(STEM_DESCRIPTIONS["drums"])


@pytest.mark.parametrize("stem", sorted(STEM_DESCRIPTIONS))
def test_each_stem_asks_for_isolation(stem):
    p = build_stem_prompt(stem, 100)
    assert "isolated" in p and "no vocals" in p


def test_user_text_is_cleaned_and_bounded():
    p = build_stem_prompt("guitar", 90, style="  indie\n\trock\x00 ", prompt="x" * 5000)
    assert "indie rock" in p
    assert "\x00" not in p and "\n" not in p
    assert p.count("x") <= MAX_TEXT_CHARS + 1


def test_unknown_stem():
    with pytest.raises(UnknownStemError):
        build_stem_prompt("piano", 120)


def test_harmony_goes_to_harmonic_stems_only():
    harmony = "in A minor, chord progression Am F C G"
    assert harmony in build_stem_prompt("bass", 120, harmony=harmony)
    assert harmony in build_stem_prompt("guitar", 120, harmony=harmony)
    assert "minor" not in build_stem_prompt("drums", 120, harmony=harmony)
    assert build_stem_prompt("bass", 120, harmony=harmony).endswith(", 120 bpm")


def test_ensemble_prompt_names_every_requested_instrument_and_excludes_the_rest():
    from stems.prompts import build_ensemble_prompt

    p = build_ensemble_prompt(["guitar", "drums"], 100, style="rock", harmony="in E minor")
    assert "electric guitar" in p and "drum kit" in p and "no bass" in p
    assert "in E minor" in p and p.endswith("100 bpm") and p.startswith("rock, ")
    everything = build_ensemble_prompt(["guitar", "bass", "drums"], 90)
    assert "no bass" not in everything and "bass guitar" in everything
    with pytest.raises(UnknownStemError):
        build_ensemble_prompt(["piano"], 90)
    with pytest.raises(UnknownStemError):
        build_ensemble_prompt([], 90)
