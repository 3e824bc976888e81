"""Fixtures of the job-store tests that run against the real Redis."""

import pytest

from tasks.jobstore import JobStore
from tests.harness import REDIS

#: The job store of these tests: Redis DB 12, flushed around each test (a test module with other
#: needs defines its own ``store``).
STORE_URL = f"{REDIS}/12"


@pytest.fixture
def store():
    """A JobStore on Redis DB 12 (60 s TTL), empty before and after the test."""
    s = JobStore(STORE_URL, ttl_seconds=60)
    s._redis.flushdb()
    yield s
    s._redis.flushdb()
