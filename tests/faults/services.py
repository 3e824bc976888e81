"""Backing services the fault suite owns, so it can stop, kill and restart them without touching
the shared ones (`make run`, other test runs): Redis servers (a primary, a replica, sentinels) and an
Azurite on their own ports."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import redis

from stemgen_settings import AZURITE_CONNECTION_STRING
from tests.harness import ROOT, free_port

AZURITE_BIN = ROOT / ".tools" / "node_modules" / ".bin" / "azurite-blob"


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def wait_port(port: int, up: bool, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if port_open(port) == up:
            return
        time.sleep(0.1)
    raise TimeoutError(f"{what} on port {port} still {'down' if up else 'up'} after {timeout}s")


class _Service:
    """A child process in its own session, with its output in a log file."""

    name = "service"

    def __init__(self, workdir: Path, port: int | None = None):
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None
        self.log_path = workdir / f"{self.name}.log"

    def args(self) -> list[str]:
        raise NotImplementedError

    def start(self, timeout: float = 60) -> None:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.args(), cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        log.close()
        wait_port(self.port, True, timeout, self.name)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> None:
        """Stop the process (SIGTERM: a clean shutdown) and wait until the port is closed."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        wait_port(self.port, False, 10, self.name)

    def kill(self) -> None:
        """SIGKILL: no shutdown of any kind (Redis writes no final AOF or snapshot)."""
        self.stop(signal.SIGKILL)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


#: The shipped durable Redis configuration (`make run`; compose.yaml passes the same flags).
DURABLE_CONF = ROOT / "deploy" / "local" / "redis-durable.conf"


class RedisServer(_Service):
    """redis-server with the shipped configuration (an append-only file fsynced before every answer):
    a restart, even after SIGKILL, keeps every message (the queues, the unacknowledged messages,
    the job records). ``replica_of``: the port of a primary to replicate."""

    name = "redis"

    def __init__(self, workdir: Path, port: int | None = None, replica_of: int | None = None):
        super().__init__(workdir, port)
        self.replica_of = replica_of

    def args(self) -> list[str]:
        # A copy: Sentinel makes a demoted primary rewrite its configuration file (CONFIG REWRITE).
        conf = self.workdir / "redis.conf"
        if not conf.exists():
            shutil.copyfile(DURABLE_CONF, conf)
        args = ["redis-server", str(conf), "--port", str(self.port), "--bind", "127.0.0.1",
                "--dir", str(self.workdir), "--protected-mode", "no"]
        if self.replica_of:
            args += ["--replicaof", "127.0.0.1", str(self.replica_of)]
        return args

    def url(self, db: int) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=5, decode_responses=True)

    def role(self) -> str:
        """"master" or "slave" (Redis' words), "" when it cannot be reached."""
        try:
            return self.client().info("replication")["role"]
        except redis.RedisError:
            return ""

    def wait_replicas_online(self, count: int, timeout: float = 60) -> None:
        """Until ``count`` replicas are attached and in sync (state online)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                info = self.client().info("replication")
            except redis.RedisError:
                info = {}
            online = [v for k, v in info.items()
                      if k.startswith("slave") and isinstance(v, dict) and v.get("state") == "online"]
            if len(online) >= count:
                return
            time.sleep(0.2)
        raise TimeoutError(f"redis {self.port}: {count} replica(s) not online after {timeout}s")


class RedisSentinel(_Service):
    """A Redis Sentinel watching one primary under ``master``: it takes the primary for down after
    ``down_after_ms`` without an answer and, with ``quorum`` sentinels agreeing, promotes a replica.
    Its configuration file lives in ``workdir`` (Sentinel rewrites it)."""

    name = "sentinel"

    def __init__(self, workdir: Path, master: str, primary_port: int, *, quorum: int = 2,
                 down_after_ms: int = 1000, failover_timeout_ms: int = 5000):
        super().__init__(workdir)
        self.master, self.monitored_port, self.quorum = master, primary_port, quorum
        self.down_after_ms, self.failover_timeout_ms = down_after_ms, failover_timeout_ms
        self.conf = workdir / "sentinel.conf"

    def args(self) -> list[str]:
        if not self.conf.exists():
            self.conf.write_text("\n".join([
                f"port {self.port}", "bind 127.0.0.1", "protected-mode no", f"dir {self.workdir}",
                f"sentinel monitor {self.master} 127.0.0.1 {self.monitored_port} {self.quorum}",
                f"sentinel down-after-milliseconds {self.master} {self.down_after_ms}",
                f"sentinel failover-timeout {self.master} {self.failover_timeout_ms}",
                f"sentinel parallel-syncs {self.master} 1", ""]))
        return ["redis-server", str(self.conf), "--sentinel"]

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=5, decode_responses=True)

    def primary_port(self) -> int | None:
        """The port of the primary this sentinel currently names (None when it cannot be asked)."""
        try:
            address = self.client().sentinel_get_master_addr_by_name(self.master)
        except redis.RedisError:
            return None
        return int(address[1]) if address else None

    def wait_ready(self, replicas: int, other_sentinels: int, timeout: float = 60) -> None:
        """Until this sentinel knows the replicas and the other sentinels (it needs both to fail
        over: a majority of the sentinels must authorize the promotion)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                state = self.client().sentinel_master(self.master)
                if (int(state.get("num-slaves", 0)) >= replicas
                        and int(state.get("num-other-sentinels", 0)) >= other_sentinels):
                    return
            except redis.RedisError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"sentinel {self.port} does not see {replicas} replica(s) and "
                           f"{other_sentinels} other sentinel(s) after {timeout}s")


class Azurite(_Service):
    """Azurite's blob service; its data stays in ``workdir`` across restarts."""

    name = "azurite"

    def args(self) -> list[str]:
        return [str(AZURITE_BIN), "--silent", "--location", str(self.workdir / "data"),
                "--blobHost", "127.0.0.1", "--blobPort", str(self.port), "--skipApiVersionCheck",
                "--loose"]

    def connection_string(self) -> str:
        return AZURITE_CONNECTION_STRING.replace("127.0.0.1:10000", f"127.0.0.1:{self.port}")
