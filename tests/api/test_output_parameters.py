"""parameters.output of POST /generate: the delivered format; every invalid value is a 422 that
names the field, and the accepted values reach the task layer with the defaults filled in."""

import pytest

from api.openapi import build_openapi
from stemgen_settings import load_settings
from stems.audio import OutputSpec
from tests.api import test_routes as routes

# the gateway against a fake task layer (tests/api/test_routes.py): its fixtures and body
client, service, body = routes.client, routes.service, routes.body


def params(**extra):
    return {"target_bpm": 120.0, "duration_seconds": 8.0, **extra}


def submitted_output(service):
    return service.submitted[-1][0]["parameters"]["output"]


def test_default_is_24_bit_wav_at_48_khz_with_the_models_channels(client, service):
    assert client.post("/generate", json=body(parameters=params())).status_code == 202
    output = submitted_output(service)
    assert output == {"format": "wav", "sample_rate": 48000, "bit_depth": 24, "channels": None,
                      "bitrate_kbps": None}
    assert OutputSpec.from_dict(output) == OutputSpec("wav", 48000, 24, None, None)


@pytest.mark.parametrize("output, expected", [
    ({}, {"format": "wav", "sample_rate": 48000, "bit_depth": 24, "channels": None, "bitrate_kbps": None}),
    ({"format": "flac", "sample_rate": 44100, "bit_depth": 16, "channels": 2},
     {"format": "flac", "sample_rate": 44100, "bit_depth": 16, "channels": 2, "bitrate_kbps": None}),
    ({"format": "wav", "sample_rate": 32000, "channels": 1},
     {"format": "wav", "sample_rate": 32000, "bit_depth": 24, "channels": 1, "bitrate_kbps": None}),
    ({"format": "mp3"},
     {"format": "mp3", "sample_rate": 48000, "bit_depth": None, "channels": None, "bitrate_kbps": 320}),
    ({"format": "mp3", "sample_rate": 44100, "channels": 2, "bitrate_kbps": 128},
     {"format": "mp3", "sample_rate": 44100, "bit_depth": None, "channels": 2, "bitrate_kbps": 128}),
    ({"format": "mp3", "bit_depth": None, "bitrate_kbps": None},
     {"format": "mp3", "sample_rate": 48000, "bit_depth": None, "channels": None, "bitrate_kbps": 320}),
])
def test_accepted_outputs_reach_the_worker_with_defaults_filled(client, service, output, expected):
    r = client.post("/generate", json=body(parameters=params(output=output)))
    assert r.status_code == 202, r.json
    assert submitted_output(service) == expected
    OutputSpec.from_dict(expected)  # what the worker reads back is valid


@pytest.mark.parametrize("output, field, words", [
    ({"format": "ogg"}, "parameters.output.format", "'wav', 'flac' or 'mp3'"),
    ({"format": "WAV"}, "parameters.output.format", "'wav', 'flac' or 'mp3'"),
    ({"sample_rate": 22050}, "parameters.output.sample_rate", "32000, 44100 or 48000"),
    ({"sample_rate": "48000"}, "parameters.output.sample_rate", "32000, 44100 or 48000"),
    ({"sample_rate": True}, "parameters.output.sample_rate", "boolean"),
    ({"bit_depth": 32}, "parameters.output.bit_depth", "16 or 24"),
    ({"bit_depth": 8}, "parameters.output.bit_depth", "16 or 24"),
    ({"format": "mp3", "bit_depth": 16}, "parameters.output.bit_depth", "does not apply to mp3"),
    ({"format": "mp3", "bit_depth": 24}, "parameters.output.bit_depth", "does not apply to mp3"),
    ({"channels": 0}, "parameters.output.channels", "1 or 2"),
    ({"channels": 6}, "parameters.output.channels", "1 or 2"),
    ({"channels": True}, "parameters.output.channels", "boolean"),
    ({"format": "mp3", "bitrate_kbps": 96}, "parameters.output.bitrate_kbps", "128, 160, 192, 224, 256 or 320"),
    ({"format": "mp3", "bitrate_kbps": 500}, "parameters.output.bitrate_kbps", "320"),
    ({"bitrate_kbps": 320}, "parameters.output.bitrate_kbps", "mp3 only, not wav"),
    ({"format": "flac", "bitrate_kbps": 256}, "parameters.output.bitrate_kbps", "mp3 only, not flac"),
    ({"codec": "opus"}, "parameters.output.codec", "Extra inputs"),
])
def test_invalid_outputs_are_named(client, service, output, field, words):
    r = client.post("/generate", json=body(parameters=params(output=output)))
    assert r.status_code == 422, r.json
    error = r.json["error"]
    assert [f["field"] for f in error["fields"]] == [field]
    assert words in error["fields"][0]["message"]
    assert field in error["message"]
    assert not service.submitted


@pytest.mark.parametrize("output", [None, "wav", ["wav"], 48000])
def test_output_must_be_an_object(client, service, output):
    r = client.post("/generate", json=body(parameters=params(output=output)))
    assert r.status_code == 422
    assert [f["field"] for f in r.json["error"]["fields"]] == ["parameters.output"]


def test_the_openapi_document_describes_output_and_the_stem_format_fields():
    doc = build_openapi(load_settings())
    schemas = doc["components"]["schemas"]
    output = schemas["OutputFormat"]["properties"]
    assert output["format"]["enum"] == ["wav", "flac", "mp3"] and output["format"]["default"] == "wav"
    assert output["sample_rate"]["enum"] == [32000, 44100, 48000]
    assert output["sample_rate"]["default"] == 48000
    assert schemas["OutputFormat"]["additionalProperties"] is False
    stem = schemas["StemResult"]["properties"]
    assert {"format", "sample_rate", "bit_depth", "bitrate_kbps", "channels", "channels_source",
            "content_type"} <= set(stem)
