"""The musical-plan parameters of POST /generate: validation names the field (422)."""

import pytest

from tests.api.test_routes import body, client, service  # noqa: F401 (fixtures)


def params(**extra):
    return {"target_bpm": 120.0, "duration_seconds": 8.0, **extra}


def test_key_chords_and_arrangement_are_accepted(client, service):
    r = client.post("/generate", json=body(parameters=params(
        key="F# minor", chords=["F#m", "D", "A", "E"], arrangement="ensemble")))
    assert r.status_code == 202, r.json
    parameters = service.submitted[0][0]["parameters"]
    assert parameters["key"] == "F# minor" and parameters["arrangement"] == "ensemble"
    assert parameters["chords"] == ["F#m", "D", "A", "E"]


def test_defaults(client, service):
    assert client.post("/generate", json=body(parameters=params())).status_code == 202
    parameters = service.submitted[0][0]["parameters"]
    assert parameters["arrangement"] == "independent"
    assert parameters["condition_on_audio"] is False
    assert parameters["key"] is None and parameters["chords"] is None


@pytest.mark.parametrize("extra, field, words", [
    ({"key": "H minor"}, "parameters.key", "H minor"),
    ({"key": ""}, "parameters.key", ""),
    ({"chords": ["Am", "Xq7"]}, "parameters.chords", "chords[1]"),
    ({"chords": []}, "parameters.chords", ""),
    ({"chords": ["Am"] * 65}, "parameters.chords", ""),
    ({"arrangement": "orchestra"}, "parameters.arrangement", ""),
    ({"source_audio_url": "https://files.example/a.wav"}, "parameters.source_audio_url", "condition_on_audio"),
])
def test_invalid_plan_parameters_are_named(client, service, extra, field, words):
    r = client.post("/generate", json=body(parameters=params(**extra)))
    assert r.status_code == 422, r.json
    fields = r.json["error"]["fields"]
    assert [f["field"] for f in fields] == [field]
    assert words in fields[0]["message"]
    assert not service.submitted


def test_target_bpm_may_come_from_the_source(client, service):
    r = client.post("/generate", json=body(parameters={"duration_seconds": 8.0, "condition_on_audio": True}))
    assert r.status_code == 202, r.json
    r = client.post("/generate", json=body(generation_request_id="gen-2",
                                           parameters={"duration_seconds": 8.0}))
    assert r.status_code == 422
    assert r.json["error"]["fields"][0]["field"] == "parameters.target_bpm"


def test_source_audio_url_goes_through_the_ssrf_guard(client, service):
    r = client.post("/generate", json=body(parameters=params(
        condition_on_audio=True, source_audio_url="http://127.0.0.1:9/song.wav")))
    assert r.status_code == 422
    field = r.json["error"]["fields"][0]
    assert field["field"] == "parameters.source_audio_url"
    assert field["type"] == "source_audio_url_refused"
    assert not service.submitted


def test_openapi_documents_the_plan(client):
    doc = client.get("/openapi.json").json
    schemas = doc["components"]["schemas"]
    properties = schemas["GenerationParameters"]["properties"]
    for name in ("key", "chords", "arrangement", "condition_on_audio", "source_audio_url"):
        assert name in properties
    assert "plan" in schemas["JobStatus"]["properties"]
    assert "coherence" in schemas["CallbackBody"]["properties"]


def song(**extra):
    return {"condition_on_audio": True, **extra}


@pytest.mark.parametrize("region", [
    {"start_bar": 5, "bars": 8},
    {"start_seconds": 12.5},
    {"start_seconds": 0, "bars": 4},
    {"bars": 2},
])
def test_source_region_forms_are_accepted(client, service, region):
    parameters = song(source_region=region, duration_seconds=8.0)
    r = client.post("/generate", json=body(parameters=parameters))
    assert r.status_code == 202, r.json
    submitted = service.submitted[0][0]["parameters"]
    assert {k: v for k, v in submitted["source_region"].items() if v is not None} == region
    assert submitted["source_mode"] == "accompany"


def test_bars_make_duration_optional(client, service):
    r = client.post("/generate", json=body(parameters=song(source_region={"start_bar": 3, "bars": 4},
                                                           source_mode="continue")))
    assert r.status_code == 202, r.json
    submitted = service.submitted[0][0]["parameters"]
    assert submitted["duration_seconds"] is None and submitted["source_mode"] == "continue"


@pytest.mark.parametrize("parameters, field, words", [
    (song(source_region={"start_bar": 1, "bars": 0}, duration_seconds=8.0),
     "parameters.source_region.bars", "greater than or equal to 1"),
    (song(source_region={"start_bar": 0}, duration_seconds=8.0),
     "parameters.source_region.start_bar", "greater than or equal to 1"),
    (song(source_region={"start_seconds": -1.0}, duration_seconds=8.0),
     "parameters.source_region.start_seconds", "greater than or equal to 0"),
    (song(source_region={"start_seconds": 600.0}, duration_seconds=8.0),
     "parameters.source_region.start_seconds", "SOURCE_AUDIO_MAX_SECONDS"),
    (song(source_region={"start_bar": 2, "start_seconds": 4.0}, duration_seconds=8.0),
     "parameters.source_region", "not both"),
    (song(source_region={"start_bar": 2, "beats": 4}, duration_seconds=8.0),
     "parameters.source_region.beats", "Extra inputs"),
    (song(source_region={"start_bar": True}, duration_seconds=8.0),
     "parameters.source_region.start_bar", "boolean"),
    (song(source_region={"start_bar": 2}), "parameters.duration_seconds", "source_region gives bars"),
    (song(), "parameters.duration_seconds", "source_region gives bars"),
    (song(source_region={"bars": 64}, target_bpm=120.0),
     "parameters.source_region", "MAX_DURATION_SECONDS"),
    (song(source_mode="sideways", duration_seconds=8.0), "parameters.source_mode", ""),
    ({"target_bpm": 120, "duration_seconds": 8.0, "source_region": {"start_bar": 2}},
     "parameters.source_region", "condition_on_audio"),
    ({"target_bpm": 120, "duration_seconds": 8.0, "source_mode": "continue"},
     "parameters.source_mode", "condition_on_audio"),
])
def test_invalid_source_region_is_named(client, service, parameters, field, words):
    r = client.post("/generate", json=body(parameters=parameters))
    assert r.status_code == 422, r.json
    fields = r.json["error"]["fields"]
    assert [f["field"] for f in fields] == [field]
    assert words in fields[0]["message"]
    assert not service.submitted
