"""Property-based fuzzing of the served OpenAPI document (schemathesis): schema-valid and
schema-violating requests to every operation of a real gunicorn gateway; no answer may be a 5xx,
and every answer must be one the document declares, with a body matching its schema.

The gateway here has its own broker and job-store databases and no worker, so the jobs the fuzzer
creates are never generated; they are dropped afterwards.
"""

from __future__ import annotations

import collections

import pytest
import redis
import requests
from hypothesis import HealthCheck, Phase, given, settings

from tests.faults.flow import API_KEY, LEDGER, Scenario
from tests.harness import start_gateway

schemathesis = pytest.importorskip("schemathesis")
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import CHECKS  # noqa: E402

#: Examples per operation and generation mode (hypothesis stops earlier when an operation has
#: fewer distinct inputs, e.g. the parameterless health checks).
EXAMPLES = {"POST /generate": 800, "GET /jobs/{job_id}": 300}
DEFAULT_EXAMPLES = 25
MIN_REQUESTS = 2000


@pytest.fixture
def fuzz_gateway(stack_env, redis_server, fault_tmp):
    env = dict(stack_env, BROKER_URL=redis_server.url(2), RESULT_BACKEND=redis_server.url(3),
               HEALTH_WORKER_TIMEOUT_SECONDS="0.1", GUNICORN_ACCESSLOG="/dev/null")
    tmp = fault_tmp / "fuzz"
    tmp.mkdir(exist_ok=True)
    gateway, base = start_gateway(env, tmp)
    try:
        yield base
    finally:
        gateway.stop()
        for db in (2, 3):
            redis.Redis.from_url(redis_server.url(db)).flushdb()


def test_fuzz_served_openapi_no_5xx(fuzz_gateway, timed):
    scenario = Scenario("fuzz served OpenAPI (schemathesis)", fuzz=True)
    LEDGER.append(scenario)
    schema = schemathesis.openapi.from_url(f"{fuzz_gateway}/openapi.json")
    session = requests.Session()
    auth = {"Authorization": f"Bearer {API_KEY}"}
    statuses: collections.Counter = collections.Counter()
    server_errors: list[str] = []
    violations: list[str] = []
    checks = [CHECKS.get_one(name) for name in (
        "not_a_server_error", "status_code_conformance", "content_type_conformance",
        "response_schema_conformance")]

    for result in schema.get_all_operations():
        operation = result.ok()
        label = f"{operation.method.upper()} {operation.path}"
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            examples = EXAMPLES.get(label, DEFAULT_EXAMPLES)

            @settings(max_examples=examples, deadline=None, database=None, derandomize=False,
                      phases=[Phase.explicit, Phase.generate],
                      suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy(generation_mode=mode))
            def run(case):
                response = case.call(base_url=fuzz_gateway, session=session, headers=auth, timeout=30)
                statuses[response.status_code] += 1
                scenario.http_attempts += 1
                if response.status_code >= 500:
                    server_errors.append(f"{label} {response.status_code}: {case.as_curl_command()}")
                    return
                try:
                    case.validate_response(response, checks=checks)
                except (AssertionError, BaseExceptionGroup) as exc:  # a Failure, or a FailureGroup
                    violations.append(f"{label} ({mode.value}): {str(exc)[:400]}")

            try:
                run()
            except Exception as exc:  # an operation without schema-violating inputs, e.g. no parameters
                if mode is GenerationMode.POSITIVE:
                    raise
                scenario.notes.append(f"{label} negative: {exc.__class__.__name__}")

    scenario.sent = sum(statuses.values())
    scenario.notes.append("statuses " + ", ".join(f"{code}×{n}" for code, n in sorted(statuses.items())))
    scenario.notes.append(f"5xx: {len(server_errors)}; schema violations: {len(violations)}")
    assert not server_errors, "\n".join(server_errors[:10])
    assert scenario.sent >= MIN_REQUESTS, statuses
    assert not violations, "\n".join(violations[:10])
