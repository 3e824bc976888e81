"""Rendered stems kept while their upload fails: a retry, on any worker, uploads the kept file
instead of generating the stem again.

One Redis hash per stem (``stemgen:staged:{job_id}:{stem}``: the file's bytes, base64, and what
its result needs, JSON), written when an upload meets unreachable storage and deleted once the
stem is stored. Bounded in size (a file over the caller's limit is not kept: its retry generates
again) and in age (the key's TTL, after which a retry generates again).
"""

from __future__ import annotations

import base64
import json

from tasks.jobstore.records import staged_key


class StagingMixin:
    """JobStore's staged renders (``self._redis`` is JobStore's)."""

    def stage_rendered(self, job_id: str, stem: str, data: bytes, details: dict, *,
                       max_bytes: int, ttl_seconds: int) -> bool:
        """Keep a rendered stem's file (``data``) and the JSON-able ``details`` its upload and
        result need, for ``ttl_seconds``; False (nothing kept) when ``data`` is over ``max_bytes``
        or either bound is 0."""
        if not 0 < len(data) <= max_bytes or ttl_seconds <= 0:
            return False
        key = staged_key(job_id, stem)
        with self._redis.pipeline() as pipe:
            pipe.hset(key, mapping={"data": base64.b64encode(data).decode("ascii"),
                                    "details": json.dumps(details, separators=(",", ":"))})
            pipe.expire(key, int(ttl_seconds))
            pipe.execute()
        return True

    def staged_rendered(self, job_id: str, stem: str) -> tuple[bytes, dict] | None:
        """A kept rendered stem: (file bytes, details), or None."""
        fields = self._redis.hgetall(staged_key(job_id, stem))
        if not fields.get("data") or not fields.get("details"):
            return None
        return base64.b64decode(fields["data"]), json.loads(fields["details"])

    def drop_staged(self, job_id: str, stem: str) -> None:
        """Forget a kept rendered stem (it was stored)."""
        self._redis.delete(staged_key(job_id, stem))
