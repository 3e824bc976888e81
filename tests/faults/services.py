"""Backing services the fault suite owns, so it can stop and restart them without touching the
shared ones (`make run`, other test runs): a Redis server and an Azurite on their own ports."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

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

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


class RedisServer(_Service):
    """redis-server with an append-only file fsynced on every write: a restart keeps every message
    (the queues, the unacknowledged messages, the job records)."""

    name = "redis"

    def args(self) -> list[str]:
        return ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "yes", "--appendfsync", "always", "--dir", str(self.workdir),
                "--protected-mode", "no"]

    def url(self, db: int) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"


class Azurite(_Service):
    """Azurite's blob service; its data stays in ``workdir`` across restarts."""

    name = "azurite"

    def args(self) -> list[str]:
        return [str(AZURITE_BIN), "--silent", "--location", str(self.workdir / "data"),
                "--blobHost", "127.0.0.1", "--blobPort", str(self.port), "--skipApiVersionCheck",
                "--loose"]

    def connection_string(self) -> str:
        return AZURITE_CONNECTION_STRING.replace("127.0.0.1:10000", f"127.0.0.1:{self.port}")
