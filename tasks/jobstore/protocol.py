"""Reading many jobs' event streams with one blocking ``XREAD``, packed and sent on a pooled
connection (the Redis protocol, RESP, written here: see EventFeed)."""

from __future__ import annotations

import secrets

import redis

from tasks.jobstore.records import _PREFIX, EVENTS_MAXLEN, JobEvent, events_key


class EventFeed:
    """Reads the event streams of many jobs with one blocking ``XREAD`` on its own connection.

    One per gateway process (api.events.EventHub): each client watching a job would otherwise hold
    a blocking Redis connection of its own. ``wake`` ends a ``wait`` in progress (from another
    thread or greenlet), so that it can start again with more streams: the wait also reads this
    feed's own small stream, to which ``wake`` appends.

    Every event ends the wait, and the next one names every watched stream again: the command is
    packed here from each stream's cached bytes (redis-py's packing of ~500 arguments was 0.5 ms
    per event, most of the gateway's CPU, in bench.events).

    Args:
        client: a Redis client of its own (``decode_responses``), whose socket timeout is above
            the longest wait (``JobStore.event_feed`` makes one).
        max_block_seconds: the longest ``wait``.
    """

    def __init__(self, client: redis.Redis, max_block_seconds: float = 5.0):
        self._redis = client
        self.max_block_seconds = max_block_seconds
        self._wake_key = f"{_PREFIX}:events-wake:{secrets.token_hex(8)}"
        self._wake_after = "0-0"
        self._keys: dict[str, bytes] = {}  # job id -> its stream key as a RESP bulk string
        self._ids: dict[tuple[int, int], bytes] = {}  # position -> its id as a RESP bulk string

    def wait(self, positions: dict[str, tuple[int, int]], block_seconds: float) -> list[JobEvent]:
        """The events after ``positions`` (job id → the last event id already had, as
        ``event_id_key`` gives it), waiting up to ``block_seconds`` (at most
        ``max_block_seconds``) for one; empty when the wait timed out or was woken.

        Raises:
            redis.RedisError: Redis is unreachable.
        """
        block = max(1, int(1000 * min(block_seconds, self.max_block_seconds)))
        job_ids = list(positions)
        head = ["XREAD", "COUNT", str(EVENTS_MAXLEN), "BLOCK", str(block), "STREAMS"]
        parts = [f"*{len(head) + 2 * len(job_ids) + 2}\r\n".encode()]
        parts += [_bulk(word) for word in head]
        parts += [self._key(job_id) for job_id in job_ids]
        parts.append(_bulk(self._wake_key))
        parts += [self._id(positions[job_id]) for job_id in job_ids]
        parts.append(_bulk(self._wake_after))
        reply = self._call(b"".join(parts)) or []
        if len(self._ids) > 4 * len(job_ids) + 100:  # positions move on: forget old ones
            self._ids.clear()
        if len(self._keys) > 2 * len(job_ids) + 100:
            self._keys = {job_id: self._keys[job_id] for job_id in job_ids if job_id in self._keys}
        if isinstance(reply, dict):  # RESP3 clients answer a map
            reply = list(reply.items())
        events = []
        prefix = events_key("")
        for key, entries in reply:
            key = key.decode() if isinstance(key, bytes) else key
            if key == self._wake_key:
                self._wake_after = entries[-1][0] if entries else self._wake_after
                continue
            job_id = key[len(prefix):]
            for entry_id, values in entries:
                fields = dict(zip(values[::2], values[1::2])) if isinstance(values, list) else values
                events.append(JobEvent.from_entry(job_id, entry_id, fields))
        return events

    def _key(self, job_id: str) -> bytes:
        packed = self._keys.get(job_id)
        if packed is None:
            packed = self._keys[job_id] = _bulk(events_key(job_id))
        return packed

    def _id(self, position: tuple[int, int]) -> bytes:
        packed = self._ids.get(position)
        if packed is None:
            packed = self._ids[position] = _bulk(f"{position[0]}-{position[1]}")
        return packed

    def _call(self, packed: bytes):
        """Send a packed command on a pooled connection and read its answer; a connection that
        failed is dropped (it may hold half an answer)."""
        pool = self._redis.connection_pool
        connection = pool.get_connection()
        try:
            connection.send_packed_command([packed])
            return connection.read_response()
        except BaseException:
            connection.disconnect()
            raise
        finally:
            pool.release(connection)

    def wake(self) -> None:
        """End the ``wait`` in progress (or make the next one return at once)."""
        with self._redis.pipeline(transaction=False) as pipe:
            pipe.xadd(self._wake_key, {"w": "1"}, maxlen=1)
            pipe.expire(self._wake_key, 600)  # only a wait in progress needs it
            pipe.execute()

    def close(self) -> None:
        self._redis.close()


def _bulk(text: str) -> bytes:
    """``text`` as a RESP bulk string."""
    data = text.encode()
    return b"$%d\r\n%s\r\n" % (len(data), data)
