"""One place that turns a Redis URL into a client: plain Redis, TLS, a Unix socket, or a primary
found through Redis Sentinel, with an optional replication guarantee for every write.

URL forms (``RESULT_BACKEND``, and ``BROKER_URL`` when the broker is Redis):

- ``redis://[[user]:password@]host[:port][/db][?option=value...]`` (redis-py's own options, such
  as ``socket_timeout``, pass through), ``rediss://...`` (TLS), ``unix://[[user]:password@]/path?db=N``;
- ``sentinel://[[user]:password@]host[:port][,host[:port]...][/db]?master=NAME`` with the
  sentinels' addresses (port 26379 when omitted), the name Sentinel monitors the primary under
  (``sentinel monitor NAME ...``), and optionally ``sentinel_password=...`` when the sentinels
  themselves require one. The user and password are the Redis servers' (primary and replicas).

Two stemgen options are accepted on every form and removed before redis-py or Celery see the URL:

- ``wait_replicas=N`` (default 0): every write of the job store returns only once N replicas hold
  it (Redis ``WAIT``), so a write that was answered survives the loss of the primary (a Sentinel
  failover promotes a replica that has it). 0: no waiting; durability is then the primary's own
  (``appendfsync always``: on disk before the answer).
- ``wait_timeout_ms=M`` (default 1000): how long a write waits for those replicas; then
  ``ReplicationTimeout`` is raised (the write may or may not survive a failover: the gateway
  answers 503 and the backend retries the same request).

The wait covers more than the write it follows: before each ``WAIT`` the client publishes an
empty message (``PUBLISH``, which Redis propagates to replicas), which moves the connection's
replication offset to the primary's current one. The replicas' acknowledgement therefore covers
every write the primary had applied by then, by any client: also the Celery broker messages and
results held in the same Redis, and a job recorded by an earlier request whose own wait timed out.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit

import redis
import redis.client
from redis.sentinel import Sentinel

SCHEMES = ("redis", "rediss", "unix", "sentinel")
SENTINEL_PORT = 26379
DEFAULT_WAIT_TIMEOUT_MS = 1000
#: Channel of the empty message published before each WAIT (see the module docstring); nobody
#: subscribes to it.
BARRIER_CHANNEL = "stemgen:replication-barrier"
#: Query options of a sentinel:// URL besides stemgen's own (anything else is refused: there is
#: no redis-py URL parser behind a sentinel URL to hand them to).
_SENTINEL_OPTIONS = ("master", "sentinel_password")
_STEMGEN_OPTIONS = ("wait_replicas", "wait_timeout_ms")

#: Commands that change no data (first word): no WAIT after them. Anything else counts as a write,
#: so a command this list misses only costs a wait, never a lost write.
_NO_WAIT = frozenset("""
    GET MGET STRLEN GETRANGE EXISTS TYPE TTL PTTL EXPIRETIME KEYS SCAN DBSIZE RANDOMKEY
    HGET HGETALL HMGET HEXISTS HKEYS HVALS HLEN HSTRLEN HSCAN HRANDFIELD
    ZCARD ZCOUNT ZRANGE ZRANGEBYSCORE ZRANGEBYLEX ZREVRANGE ZREVRANGEBYSCORE ZREVRANGEBYLEX
    ZSCORE ZMSCORE ZRANK ZREVRANK ZSCAN ZLEXCOUNT
    LLEN LRANGE LINDEX LPOS SCARD SISMEMBER SMISMEMBER SMEMBERS SSCAN SRANDMEMBER
    XRANGE XREVRANGE XREAD XLEN XINFO
    EVAL_RO EVALSHA_RO FCALL_RO
    TIME PING ECHO INFO ROLE COMMAND CONFIG CLIENT SCRIPT MEMORY OBJECT SLOWLOG LASTSAVE
    WAIT PUBLISH SELECT AUTH HELLO QUIT RESET
""".split())


class RedisURLError(ValueError):
    """A Redis URL stemgen cannot use (unknown scheme, no sentinel address or master name, a bad
    option value)."""


class ReplicationTimeout(redis.exceptions.TimeoutError):
    """A write was applied by the primary but fewer replicas than ``wait_replicas`` acknowledged
    it within ``wait_timeout_ms``: it may be lost if the primary fails now.

    A ``redis.exceptions.TimeoutError``, so callers treat it as Redis being unavailable (the
    gateway answers 503; worker tasks retry). Every job-store write is idempotent, so repeating it
    is safe."""

    def __init__(self, wanted: int, acknowledged: int, timeout_ms: int):
        super().__init__(f"{acknowledged} of {wanted} replicas acknowledged the write within "
                         f"{timeout_ms} ms")
        self.wanted, self.acknowledged, self.timeout_ms = wanted, acknowledged, timeout_ms


@dataclass(frozen=True)
class RedisURL:
    """A parsed stemgen Redis URL.

    ``url`` is the URL without stemgen's options (for redis-py's ``from_url``; empty for
    sentinel://). For sentinel://, ``sentinels`` holds (host, port) pairs and ``master`` the
    monitored name.
    """

    scheme: str
    url: str = ""
    sentinels: tuple[tuple[str, int], ...] = ()
    master: str = ""
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_password: str | None = None
    wait_replicas: int = 0
    wait_timeout_ms: int = DEFAULT_WAIT_TIMEOUT_MS
    options: dict[str, str] = field(default_factory=dict)


def _int_option(query: dict[str, str], name: str, default: int, minimum: int) -> int:
    raw = query.pop(name, None)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise RedisURLError(f"{name} must be a whole number, got {raw!r}") from None
    if value < minimum:
        raise RedisURLError(f"{name} must be at least {minimum}, got {value}")
    return value


def _split_host(item: str) -> tuple[str, int]:
    """``host[:port]`` or ``[v6-address][:port]`` → (host, port); the sentinel port by default."""
    if item.startswith("["):
        host, _, rest = item[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    else:
        host, _, port = item.rpartition(":") if ":" in item else (item, "", "")
    if not host:
        raise RedisURLError(f"sentinel address {item!r} has no host")
    try:
        return host, int(port) if port else SENTINEL_PORT
    except ValueError:
        raise RedisURLError(f"sentinel address {item!r} has a bad port") from None


def parse_redis_url(url: str) -> RedisURL:
    """Parse a stemgen Redis URL (forms in the module docstring).

    Raises:
        RedisURLError: unknown scheme; a sentinel URL without addresses or ``master``, with an
            unknown option, or with a bad db; a bad ``wait_replicas`` / ``wait_timeout_ms``.
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise RedisURLError(f"not a Redis URL (redis://, rediss://, unix:// or sentinel://): {url!r}")
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    wait_replicas = _int_option(query, "wait_replicas", 0, 0)
    wait_timeout_ms = _int_option(query, "wait_timeout_ms", DEFAULT_WAIT_TIMEOUT_MS, 1)
    if scheme != "sentinel":
        # The URL as given, less stemgen's options (urlunsplit would turn unix:///path into unix:/path).
        plain = url.split("?", 1)[0]
        if query:
            plain += "?" + urlencode(query)
        return RedisURL(scheme, url=plain, wait_replicas=wait_replicas,
                        wait_timeout_ms=wait_timeout_ms, options=query)

    unknown = set(query) - set(_SENTINEL_OPTIONS)
    if unknown:
        raise RedisURLError(f"unknown option(s) {sorted(unknown)} in a sentinel URL (known: "
                            f"{', '.join(_SENTINEL_OPTIONS + _STEMGEN_OPTIONS)})")
    master = query.get("master", "")
    if not master:
        raise RedisURLError(f"a sentinel URL needs ?master=<name>: {url!r}")
    userinfo, _, hosts = parts.netloc.rpartition("@")
    username = password = None
    if userinfo:
        user, has_password, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if has_password else None
    sentinels = tuple(_split_host(item.strip()) for item in hosts.split(",") if item.strip())
    if not sentinels:
        raise RedisURLError(f"a sentinel URL needs at least one host:port: {url!r}")
    db_text = parts.path.strip("/") or "0"
    if not db_text.isdigit():
        raise RedisURLError(f"the database of a sentinel URL must be a number, got {db_text!r}")
    return RedisURL("sentinel", sentinels=sentinels, master=master, db=int(db_text),
                    username=username, password=password,
                    sentinel_password=query.get("sentinel_password") or None,
                    wait_replicas=wait_replicas, wait_timeout_ms=wait_timeout_ms)


def _first_word(command) -> str:
    if isinstance(command, bytes):
        command = command.decode()
    return str(command).split(" ", 1)[0].upper()


class ReplicatedRedis(redis.Redis):
    """A redis.Redis whose writes return only once ``wait_replicas`` replicas acknowledged them.

    A single command is sent in one round trip with ``PUBLISH`` (the barrier, see the module
    docstring) and ``WAIT``; a pipeline is followed by that pair on its own round trip.

    Raises (from any write): ReplicationTimeout.
    """

    wait_replicas = 0
    wait_timeout_ms = DEFAULT_WAIT_TIMEOUT_MS

    def _check(self, acknowledged) -> None:
        if int(acknowledged) < self.wait_replicas:
            raise ReplicationTimeout(self.wait_replicas, int(acknowledged), self.wait_timeout_ms)

    def execute_command(self, *args, **options):
        if not self.wait_replicas or _first_word(args[0]) in _NO_WAIT:
            return super().execute_command(*args, **options)
        # One connection for the three: WAIT counts the replicas that acknowledged this
        # connection's last write.
        with redis.Redis.pipeline(self, transaction=False) as pipe:
            pipe.execute_command(*args, **options)
            pipe.execute_command("PUBLISH", BARRIER_CHANNEL, "")
            pipe.execute_command("WAIT", self.wait_replicas, self.wait_timeout_ms)
            result, _, acknowledged = pipe.execute()
        self._check(acknowledged)
        return result

    def sync_replicas(self) -> None:
        """Wait until ``wait_replicas`` replicas hold everything the primary applied so far.

        Raises:
            ReplicationTimeout: fewer acknowledged within ``wait_timeout_ms``.
        """
        with redis.Redis.pipeline(self, transaction=False) as pipe:
            pipe.execute_command("PUBLISH", BARRIER_CHANNEL, "")
            pipe.execute_command("WAIT", self.wait_replicas, self.wait_timeout_ms)
            _, acknowledged = pipe.execute()
        self._check(acknowledged)

    def pipeline(self, transaction=True, shard_hint=None) -> "redis.client.Pipeline":
        if not self.wait_replicas:
            return super().pipeline(transaction, shard_hint)
        pipe = _ReplicatedPipeline(self.connection_pool, self.response_callbacks, transaction,
                                   shard_hint)
        pipe.owner = self
        return pipe


class _ReplicatedPipeline(redis.client.Pipeline):
    """A pipeline that, when it wrote anything, waits for the owner's replicas afterwards (a WAIT
    inside MULTI would not block, so it cannot ride along)."""

    owner: ReplicatedRedis

    def execute(self, raise_on_error: bool = True):
        wrote = any(_first_word(args[0]) not in _NO_WAIT for args, _ in self.command_stack)
        result = super().execute(raise_on_error)
        if wrote:
            self.owner.sync_replicas()
        return result


def connect(url: str, **options) -> redis.Redis:
    """A client for a stemgen Redis URL (forms in the module docstring).

    ``options`` are redis-py client options (``decode_responses``, ``socket_timeout`` in seconds,
    ``retry``, ...). Through Sentinel they apply to the primary's connections; the connections to
    the sentinels get the ``socket_*`` ones. The client finds the primary anew after a failover (a
    connection error, or a write refused by a demoted primary, is retried on the new one when
    ``retry`` allows).

    Returns a ``ReplicatedRedis`` when the URL asks for ``wait_replicas``, else a ``redis.Redis``.
    A direct URL's client takes connections from a ``BlockingConnectionPool`` (``max_connections``,
    default 100; ``pool_timeout`` seconds, default 20): a gevent gateway with a thousand
    concurrent requests waits for a free connection instead of failing with redis-py's
    MaxConnectionsError.

    Raises:
        RedisURLError: see ``parse_redis_url``.
    """
    parsed = parse_redis_url(url)
    max_connections = options.pop("max_connections", 100)
    pool_timeout = options.pop("pool_timeout", 20.0)
    cls = ReplicatedRedis if parsed.wait_replicas else redis.Redis
    if parsed.scheme == "sentinel":
        sentinel_kwargs = {k: v for k, v in options.items() if k.startswith("socket_")}
        if parsed.sentinel_password:
            sentinel_kwargs["password"] = parsed.sentinel_password
        credentials = {k: v for k, v in (("username", parsed.username),
                                         ("password", parsed.password)) if v is not None}
        sentinel = Sentinel(list(parsed.sentinels), sentinel_kwargs=sentinel_kwargs)
        client = sentinel.master_for(parsed.master, redis_class=cls, db=parsed.db,
                                     **credentials, **options)
    else:
        pool = redis.BlockingConnectionPool.from_url(parsed.url, max_connections=max_connections,
                                                     timeout=pool_timeout, **options)
        client = cls(connection_pool=pool)
        client.auto_close_connection_pool = True
    if parsed.wait_replicas:
        client.wait_replicas = parsed.wait_replicas
        client.wait_timeout_ms = parsed.wait_timeout_ms
    return client


def celery_url(url: str) -> tuple[str, dict]:
    """The URL and transport options Celery/kombu need for a stemgen URL (broker or result backend).

    Non-Redis URLs (``amqp://``) come back unchanged. Redis URLs lose stemgen's options (Celery
    would hand them to redis-py, which does not know them). A sentinel:// URL becomes kombu's and
    Celery's form, one ``sentinel://host:port/db`` per sentinel joined by ``;``, with
    ``{"master_name": ...}`` (and ``sentinel_kwargs`` for a sentinel password) to merge into
    ``broker_transport_options`` / ``result_backend_transport_options``.

    Raises:
        RedisURLError: a Redis URL that ``parse_redis_url`` refuses.
    """
    if urlsplit(url).scheme.lower() not in SCHEMES:
        return url, {}
    parsed = parse_redis_url(url)
    if parsed.scheme != "sentinel":
        return parsed.url, {}
    userinfo = ""
    if parsed.username or parsed.password is not None:
        userinfo = quote(parsed.username or "", safe="")
        if parsed.password is not None:
            userinfo += ":" + quote(parsed.password, safe="")
        userinfo += "@"
    hosts = ";".join(f"sentinel://{userinfo}{f'[{host}]' if ':' in host else host}:{port}/{parsed.db}"
                     for host, port in parsed.sentinels)
    options: dict = {"master_name": parsed.master}
    if parsed.sentinel_password:
        options["sentinel_kwargs"] = {"password": parsed.sentinel_password}
    return hosts, options
