"""Hostile and broken input: always a 4xx JSON naming the problem, never a 5xx (in-process; the
fault suite fuzzes the served OpenAPI over HTTP)."""

import json

import pytest
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from api import create_app
from stemgen_settings import load_settings
from tasks.service import ServiceUnavailable
from tests.api.test_routes import FakeService, body


@pytest.fixture
def service():
    return FakeService()


@pytest.fixture
def client(service):
    return create_app(load_settings(), service=service).test_client()


def assert_json_error(r, status, field=None):
    assert r.status_code == status, r.data
    assert r.is_json and r.json["error"]["status"] == status
    if field:
        assert field in [f["field"] for f in r.json["error"]["fields"]], r.json


@pytest.mark.parametrize("raw", ["[" * 60_000, '{"a":' * 6_000 + "1" + "}" * 6_000])
def test_deep_nesting_is_400(client, raw):
    assert_json_error(client.post("/generate", data=raw, content_type="application/json"), 400, "body")


def test_oversized_body_is_413_naming_it(client):
    raw = '{"a":' * 20_000 + "1" + "}" * 20_000
    r = client.post("/generate", data=raw, content_type="application/json")
    assert_json_error(r, 413, "body")
    assert "65536" in r.json["error"]["message"]


@pytest.mark.parametrize("raw", ["null", "1", '"text"', "true", "[]"])
def test_json_that_is_not_an_object_is_422(client, raw):
    assert_json_error(client.post("/generate", data=raw, content_type="application/json"), 422, "body")


@pytest.mark.parametrize("raw", [b"\xff\xfe\x00", b'{"a": 1', b"1" * 5000, b'{"a": 1}{"b": 2}'])
def test_undecodable_body_is_400(client, raw):
    assert_json_error(client.post("/generate", data=raw, content_type="application/json"), 400, "body")


@pytest.mark.parametrize("url", ["http://127.0.0.1:8000/cb", "http://localhost/cb",
                                 "http://169.254.169.254/latest/meta-data", "http://[::1]/",
                                 "http://10.0.0.5/cb", "http://0x7f.1/cb"])
def test_private_callback_url_is_422_naming_it(client, service, url):
    assert_json_error(client.post("/generate", json=body(callback_url=url)), 422, "callback_url")
    assert service.submitted == []


def test_loopback_callback_allowed_when_configured(service):
    client = create_app(load_settings(callback_allow_loopback=True), service=service).test_client()
    assert client.post("/generate", json=body(callback_url="http://127.0.0.1:8000/cb")).status_code == 202


def test_unsafe_default_callback_url_stops_start_up(service):
    with pytest.raises(ValueError, match="DEFAULT_CALLBACK_URL"):
        create_app(load_settings(default_callback_url="http://169.254.169.254/"), service=service)


def test_unavailable_backend_is_503_with_retry_after(client, service, monkeypatch):
    def down(*args, **kwargs):
        raise ServiceUnavailable("redis down")

    monkeypatch.setattr(service, "submit", down)
    monkeypatch.setattr(service, "get", down)
    r = client.post("/generate", json=body())
    assert_json_error(r, 503)
    assert r.headers["Retry-After"] == "5"
    assert_json_error(client.get("/jobs/abc"), 503)


def test_wrong_method_is_405_with_allow(client):
    r = client.put("/generate", json=body())
    assert_json_error(r, 405)
    assert "POST" in r.headers["Allow"]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=20), children,
                                                                     max_size=6),
    max_leaves=30)


def mutated_bodies():
    """Valid bodies with one field replaced, removed or added."""
    paths = [("generation_request_id",), ("audio_file_id",), ("target_stems",), ("callback_url",),
             ("parameters",), ("parameters", "target_bpm"), ("parameters", "duration_seconds"),
             ("parameters", "seed"), ("parameters", "top_k"), ("parameters", "loop"), ("extra",)]

    def mutate(path, value, remove):
        b = body()
        target = b
        for key in path[:-1]:
            target = target[key]
        if remove:
            target.pop(path[-1], None)
        else:
            target[path[-1]] = value
        return b

    return st.builds(mutate, st.sampled_from(paths), json_values, st.booleans())


@hsettings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payload=json_values | mutated_bodies())
def test_fuzzed_json_bodies_never_5xx(client, payload):
    r = client.post("/generate", data=json.dumps(payload), content_type="application/json")
    assert r.status_code < 500, r.data
    assert r.is_json
    if r.status_code >= 400:
        assert r.json["error"]["fields"] or r.status_code == 409


@hsettings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=300), content_type=st.sampled_from(
    ["application/json", "application/json; charset=utf-16", "text/plain", "", "application/x-json",
     "multipart/form-data; boundary=x", "application/problem+json"]),
    method=st.sampled_from(["POST", "PUT", "PATCH", "DELETE", "GET"]),
    path=st.sampled_from(["/generate", "/jobs/abc", "/jobs/%00", "/jobs/" + "9" * 80, "/health/live",
                          "/openapi.json", "/../etc/passwd", "/generate/"]))
def test_fuzzed_raw_requests_never_5xx(client, raw, content_type, method, path):
    r = client.open(path, method=method, data=raw, content_type=content_type)
    assert r.status_code < 500, (r.status_code, r.data)
