"""API keys: 401 JSON without a valid key, Bearer or X-API-Key, open probes and contract."""

import logging

import pytest

from api import create_app
from api.auth import _digest, key_matches
from stemgen_settings import load_settings
from tests.api.test_routes import FakeService, body

KEYS = "first-key-0123456789,second-key-0123456789"


@pytest.fixture
def service():
    return FakeService()


@pytest.fixture
def client(service):
    settings = load_settings(stemgen_api_keys=KEYS)
    return create_app(settings, service=service).test_client()


def test_no_key_is_401_json(client, service):
    r = client.post("/generate", json=body())
    assert r.status_code == 401
    assert r.json["error"]["code"] == "unauthorized"
    assert r.json["error"]["fields"][0]["field"] == "Authorization"
    assert r.headers["WWW-Authenticate"].startswith("Bearer")
    assert service.submitted == []


@pytest.mark.parametrize("headers", [
    {"Authorization": "Bearer first-key-0123456789"},
    {"Authorization": "bearer   second-key-0123456789 "},
    {"X-API-Key": "second-key-0123456789"},
    {"Authorization": "Bearer wrong", "X-API-Key": "first-key-0123456789"},
])
def test_valid_keys(client, headers):
    assert client.post("/generate", json=body(), headers=headers).status_code == 202


@pytest.mark.parametrize("headers", [
    {"Authorization": "Bearer wrong-key"},
    {"Authorization": "Basic Zmlyc3Qta2V5LTAxMjM0NTY3ODk="},
    {"Authorization": "first-key-0123456789"},
    {"Authorization": "Bearer "},
    {"X-API-Key": "first-key-012345678"},
    {"X-API-Key": "first-key-0123456789,second-key-0123456789"},
    {"X-API-Key": "first-key-0123456789x"},
])
def test_invalid_keys(client, headers):
    assert client.post("/generate", json=body(), headers=headers).status_code == 401


def test_every_private_endpoint_needs_a_key(client):
    assert client.get("/jobs/abc").status_code == 401
    assert client.get("/health").status_code == 401
    assert client.get("/no-such-path").status_code == 401  # paths are not revealed either
    assert client.get("/jobs/abc", headers={"X-API-Key": "first-key-0123456789"}).status_code == 404


def test_probes_and_contract_are_open(client, service):
    assert client.get("/health/live").status_code == 200
    assert client.get("/openapi.json").status_code == 200
    service.broker_ok = False
    ready = client.get("/health/ready")
    assert ready.status_code == 503
    assert ready.json == {"status": "unavailable", "broker": {"ok": False}, "storage": {"ok": True}}
    detailed = client.get("/health/ready", headers={"X-API-Key": "first-key-0123456789"}).json
    assert detailed["broker"]["detail"] == "down"


def test_auth_before_body_limits(client):
    # An unauthenticated caller cannot make the gateway read a large body.
    r = client.post("/generate", data="x" * 200_000, content_type="application/json")
    assert r.status_code == 401


def test_openapi_declares_the_schemes(client):
    doc = client.get("/openapi.json").json
    assert set(doc["components"]["securitySchemes"]) == {"bearerAuth", "apiKeyHeader"}
    assert doc["paths"]["/health/live"]["get"]["security"] == []
    assert "401" in doc["paths"]["/generate"]["post"]["responses"]


def test_open_without_keys_warns(caplog, service):
    with caplog.at_level(logging.WARNING, logger="api.auth"):
        client = create_app(load_settings(stemgen_api_keys=" , "), service=service).test_client()
    assert "STEMGEN_API_KEYS is empty" in caplog.text
    assert client.post("/generate", json=body()).status_code == 202


def test_key_matching_checks_every_key():
    digests = [_digest("a" * 20), _digest("b" * 20)]
    assert key_matches("a" * 20, digests) and key_matches("b" * 20, digests)
    assert not key_matches("c" * 20, digests) and not key_matches("", digests)
    assert not key_matches("a" * 20, [])
