from pathlib import Path

from stemgen_settings import Settings, load_settings

ROOT = Path(__file__).resolve().parents[1]


def test_env_example_lists_every_setting_with_its_default():
    listed = {}
    for line in (ROOT / ".env.example").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.partition("=")
            listed[name] = value
    assert set(listed) == {name.upper() for name in Settings.model_fields}
    defaults = Settings.model_construct()
    for name in Settings.model_fields:
        default = getattr(defaults, name)
        expected = ("true" if default else "false") if isinstance(default, bool) else str(default)
        assert listed[name.upper()] == expected, name


def test_environment_overrides(monkeypatch):
    monkeypatch.setenv("MUSICGEN_MODEL", "tiny")
    monkeypatch.setenv("BATCH_MAX_SIZE", "8")
    settings = load_settings()
    assert settings.musicgen_model == "tiny" and settings.batch_max_size == 8
    assert load_settings(musicgen_model="x").musicgen_model == "x"


def test_refused_decoding_combinations_name_the_variable():
    import pytest as _pytest
    from pydantic import ValidationError

    from stemgen_settings import load_settings

    with _pytest.raises(ValidationError, match="ENGINE_PRECISION=int8"):
        load_settings(stemgen_device="cuda", engine_precision="int8")
    with _pytest.raises(ValidationError, match="ENGINE_MODE=graph"):
        load_settings(stemgen_device="cpu", engine_mode="graph")
    with _pytest.raises(ValidationError, match="ATTENTION_BACKEND=xformers"):
        load_settings(stemgen_device="cuda", engine_mode="static", attention_backend="xformers")
