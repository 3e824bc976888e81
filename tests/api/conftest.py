"""Fixtures of the route tests that run against the real Redis job store."""

import pytest

from stemgen_settings import load_settings
from tasks.service import JobService
from tests.harness import REDIS

#: The job store of these tests: Redis DB 12, flushed around each test.
JOB_STORE_URL = f"{REDIS}/12"


@pytest.fixture
def real_service():
    """A JobService on the real job store (Redis DB 12), empty before and after the test."""
    service = JobService(load_settings(result_backend=JOB_STORE_URL))
    service.jobs._redis.flushdb()
    yield service
    service.jobs._redis.flushdb()
