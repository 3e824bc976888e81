"""The owner index: one sorted set of job ids per API key, newest first, paged by ``list_jobs``."""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from dataclasses import dataclass

from tasks.jobstore.records import ALL_JOBS, _STEMS, _stem_states, index_key, job_key, request_key

#: Most index entries ``list_jobs`` examines per call (a status filter may match few of them).
LIST_SCAN_MAX = 1000


class InvalidCursor(ValueError):
    """A job-list cursor that ``list_jobs`` did not make (or that was altered)."""



@dataclass(frozen=True)
class JobPage:
    """One page of ``list_jobs``: job summaries, newest first, and the cursor of the next page
    (None at the end of the list)."""

    jobs: list[dict]
    next_cursor: str | None



class OwnerIndexMixin:
    """JobStore's job list (``self._redis`` is JobStore's)."""

    @staticmethod
    def _index_key(owner: str) -> str:
        return index_key(owner)

    def list_jobs(self, owner: str = "", *, status: str | None = None,
                  generation_request_id: str | None = None, limit: int = 20,
                  cursor: str | None = None) -> JobPage:
        """The jobs submitted with the key ``owner`` identifies (see ``create``), newest first,
        ``limit`` at a time, optionally only those in ``status`` or the one job of
        ``generation_request_id``; ``cursor`` is the previous page's ``next_cursor``. ``owner``
        "*" (records.ALL_JOBS: an admin key) lists every job.

        Index entries whose record expired are skipped and removed. At most LIST_SCAN_MAX entries
        are examined per call, so a page may hold fewer than ``limit`` jobs (even none) and still
        have a next cursor; ``next_cursor`` is None at the end.

        Raises:
            InvalidCursor: ``cursor`` was not made here.
        """
        after = _decode_cursor(cursor) if cursor else None
        if generation_request_id is not None and owner != ALL_JOBS:
            return JobPage(self._job_of_request(owner, generation_request_id, status, after), None)
        index = self._index_key(owner)
        # Without a filter one more entry than asked tells whether there is a next page.
        filtered = status is not None or generation_request_id is not None
        batch_size = limit + 1 if not filtered else min(max(4 * limit, 50), 200)
        jobs: list[dict] = []
        gone: list[str] = []
        scanned, exhausted = 0, False
        while len(jobs) < limit and scanned < LIST_SCAN_MAX and not exhausted:
            entries = self._index_page(index, after, batch_size)
            records = self._summaries([job_id for job_id, _ in entries])
            exhausted = len(entries) < batch_size
            for (job_id, score), record in zip(entries, records):
                if len(jobs) == limit or scanned == LIST_SCAN_MAX:
                    exhausted = False  # entries remain after the cursor
                    break
                scanned += 1
                after = (score, job_id)
                if record is None:
                    gone.append(job_id)
                elif ((status is None or record[1]["status"] == status)
                      and generation_request_id in (None, record[1]["generation_request_id"])):
                    jobs.append(record[1])
        if gone:
            self._redis.zrem(index, *gone)
        return JobPage(jobs, None if exhausted or after is None else _encode_cursor(*after))

    def _index_page(self, index: str, after: tuple[float, str] | None,
                    count: int) -> list[tuple[str, float]]:
        """Up to ``count`` (job id, score) entries of an index, newest first, after ``after``
        ((score, job id) of the last entry already seen). Entries of equal score are ordered by
        job id, descending, as Redis orders them."""
        if after is None:
            return self._redis.zrevrangebyscore(index, "+inf", "-inf", start=0, num=count,
                                                withscores=True)
        score, last = after
        page: list[tuple[str, float]] = []
        offset = 0
        while len(page) < count:
            # Inclusive of the cursor's score: other jobs created at the same instant follow it.
            batch = self._redis.zrevrangebyscore(index, repr(score), "-inf", start=offset, num=count,
                                                 withscores=True)
            page.extend((job_id, s) for job_id, s in batch if s < score or job_id < last)
            if len(batch) < count:
                break
            offset += len(batch)
        return page[:count]

    def _summaries(self, job_ids: list[str]) -> list[tuple[str, dict] | None]:
        """Each job's owner and summary (None where the record is gone), in one round trip. Reads
        only the fields a summary shows: a finished job's callback body is most of its record."""
        if not job_ids:
            return []
        with self._redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.hmget(job_key(job_id), *_SUMMARY_FIELDS)
            rows = pipe.execute()
        return [_summary(row) for row in rows]

    def _job_of_request(self, owner: str, generation_request_id: str, status: str | None,
                        after: tuple[float, str] | None) -> list[dict]:
        """The job of a generation_request_id (its idempotency claim), when ``owner`` submitted it,
        it is in ``status`` (when given) and it comes after the cursor ``after``."""
        # the owner's claim, else one made before claims were per key (records.request_key)
        claim = (self._redis.get(request_key(generation_request_id, owner))
                 or self._redis.get(request_key(generation_request_id)))
        try:
            job_id = json.loads(claim)["job_id"] if claim else None
        except (ValueError, TypeError, KeyError):
            job_id = None
        if not job_id:
            return []
        record = self._summaries([job_id])[0]
        if record is None or record[0] != owner:
            return []
        summary = record[1]
        if status is not None and summary["status"] != status:
            return []
        if after is not None and (summary["created_at"], job_id) >= after:
            return []
        return [summary]


#: The record fields a job-list summary reads.
_SUMMARY_FIELDS = ("job_id", "request", "stems", "state", "created_at", "updated_at", "finished_at",
                   "owner", *(f"stem:{s}" for s in _STEMS))



def _summary(row: list) -> tuple[str, dict] | None:
    """(owner, job-list entry) from a ``_summaries`` HMGET row; None when the record is gone."""
    fields = dict(zip(_SUMMARY_FIELDS, row))
    if not fields.get("request") or not fields.get("stems"):
        return None
    request = json.loads(fields["request"])
    stems = []
    for state in _stem_states(json.loads(fields["stems"]), fields):
        entry = {"stem": state["stem"], "status": state["status"],
                 "progress": state.get("progress", 0.0)}
        if state.get("error"):
            entry["error"] = state["error"]
        stems.append(entry)
    created = float(fields["created_at"])
    return fields["owner"] or "", {
        "job_id": fields["job_id"],
        "generation_request_id": request["generation_request_id"],
        "audio_file_id": request.get("audio_file_id"),
        "status": fields["state"],
        "progress": round(sum(s["progress"] for s in stems) / max(len(stems), 1), 4),
        "created_at": created,
        "updated_at": float(fields["updated_at"] or created),
        "finished_at": float(fields["finished_at"]) if fields["finished_at"] else None,
        "stems": stems,
    }



def _encode_cursor(score: float, job_id: str) -> str:
    """An opaque cursor for the position (score, job id) in a job index."""
    raw = f"{score!r}:{job_id}".encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


_CURSOR = re.compile(r"^[A-Za-z0-9_-]{1,200}$")
_JOB_ID = re.compile(r"^[A-Za-z0-9]{1,64}$")


def _decode_cursor(cursor: str) -> tuple[float, str]:
    """The position a cursor holds.

    Raises:
        InvalidCursor.
    """
    if not _CURSOR.match(cursor):
        raise InvalidCursor("not a cursor this service made")
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        score_text, _, job_id = raw.partition(":")
        score = float(score_text)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise InvalidCursor("not a cursor this service made") from None
    if not math.isfinite(score) or not _JOB_ID.match(job_id):
        raise InvalidCursor("not a cursor this service made")
    return score, job_id
