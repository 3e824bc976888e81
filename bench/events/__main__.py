"""``python -m bench.events``: many open ``GET /jobs/<id>/events`` streams against the gevent gateway;
event latency (state change in Redis → event received by the client) and the gateway's CPU.

Starts the gateway as production does (``gunicorn -c deploy/gunicorn.conf.py 'api:create_app()'``)
on a free loopback port, against Redis DBs 10 (broker) and 11 (job store) by default, both
flushed before and after. No worker runs: the bench records ``--jobs`` jobs itself, opens
``--streams`` SSE connections spread over them (asyncio, raw HTTP/1.1), then a separate writer
process changes the jobs' progress through ``JobStore.update_stem`` (the call the workers make) at
``--rate`` changes per second, round robin over the jobs, noting the wall-clock time before each
call. The latency of an event is the time a client read it minus that time (same host clock), so
it includes the writer's own Redis round trips. At the end every job is finished and the time
until every stream has closed is measured.

    python -m bench.events                                   # 500 streams, 500 changes/s, 20 s
    python -m bench.events --streams 500 --jobs 50 --rate 200

Prints: streams opened and held, gateway CPU with the streams idle and under load (% of one core,
gunicorn workers' user+system time), latency p50/p90/p99/max, events expected and received, and
how long the streams took to close after the final state.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.gateway.__main__ import cpu_seconds, start_gateway, stop

ROOT = Path(__file__).resolve().parents[2]
REDIS = "redis://127.0.0.1:6379"


def children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


# --- clients --------------------------------------------------------------------------------------
class Stream:
    """One SSE client: every event it read, with the wall-clock time it read it."""

    def __init__(self, job_id: str):
        self.job_id = job_id
        self.events: list[tuple[float, dict]] = []
        self.connected = asyncio.Event()
        self.closed_at: float | None = None
        self.error: str | None = None


async def follow(port: int, key: str, stream: Stream) -> None:
    """GET /jobs/<id>/events over a raw HTTP/1.1 connection until the server ends it."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write((f"GET /jobs/{stream.job_id}/events HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                      f"Authorization: Bearer {key}\r\nAccept: text/event-stream\r\n\r\n").encode())
        status = await reader.readline()
        if b" 200 " not in status:
            raise RuntimeError(f"answered {status!r}")
        headers = b""
        while (line := await reader.readline()) not in (b"\r\n", b""):
            headers += line.lower()
        chunked = b"transfer-encoding: chunked" in headers
        buffer = b""
        while True:
            if chunked:
                size = int((await reader.readline()).strip() or b"0", 16)
                if size == 0:
                    break
                data = (await reader.readexactly(size + 2))[:-2]
            else:
                data = await reader.read(65536)
                if not data:
                    break
            now = time.time()
            buffer += data
            while b"\n\n" in buffer:
                block, buffer = buffer.split(b"\n\n", 1)
                for line in block.split(b"\n"):
                    if line.startswith(b"data: "):
                        stream.events.append((now, json.loads(line[6:])))
                        stream.connected.set()  # the backlog arrived: the hub follows this job
        writer.close()
    except Exception as exc:  # reported with the results
        stream.error = f"{exc.__class__.__name__}: {exc}"
        stream.connected.set()
    stream.closed_at = time.time()


# --- the writer (its own process: no GIL shared with the clients' timestamps) ---------------------
def write_changes(url: str, job_ids: list[str], rate: float, seconds: float, start_at: float,
                  out: str) -> None:
    from tasks.jobstore import JobStore

    store = JobStore(url)
    per_job = max(1, int(rate * seconds / len(job_ids)))
    records = []
    interval, due = 1.0 / rate, start_at
    for step in range(1, per_job + 1):
        progress = round(0.9 * step / (per_job + 1), 4)
        for job_id in job_ids:
            delay = due - time.time()
            if delay > 0:
                time.sleep(delay)
            before = time.time()
            store.update_stem(job_id, "guitar", "running", progress)
            records.append((job_id, progress, before))
            due += interval
    Path(out).write_text(json.dumps(records))


# --- the run --------------------------------------------------------------------------------------
async def run(args, port: int, key: str, job_ids: list[str], workers: list[int], url: str,
              workdir: Path) -> dict:
    streams = [Stream(job_ids[i % len(job_ids)]) for i in range(args.streams)]
    opened = time.time()
    tasks = [asyncio.create_task(follow(port, key, s)) for s in streams]
    await asyncio.wait_for(asyncio.gather(*(s.connected.wait() for s in streams)), 120)
    result: dict = {"connect_seconds": time.time() - opened,
                    "errors": [s.error for s in streams if s.error]}

    cpu0 = cpu_seconds(workers)
    await asyncio.sleep(args.idle_seconds)
    result["idle_cpu"] = (cpu_seconds(workers) - cpu0) / args.idle_seconds

    out = workdir / "writes.json"
    start_at = time.time() + 0.5
    writer = multiprocessing.get_context("fork").Process(
        target=write_changes, args=(url, job_ids, args.rate, args.seconds, start_at, str(out)))
    writer.start()
    await asyncio.sleep(max(0.0, start_at - time.time()))
    cpu0, t0 = cpu_seconds(workers), time.time()
    while writer.is_alive():
        await asyncio.sleep(0.1)
    await asyncio.sleep(1.0)  # the last events in flight
    result["load_seconds"] = time.time() - t0 - 1.0
    result["load_cpu_seconds"] = cpu_seconds(workers) - cpu0
    result["open_after_load"] = sum(s.closed_at is None for s in streams)

    writes = {(job_id, progress): at for job_id, progress, at in json.loads(out.read_text())}
    result["writes"] = len(writes)
    latencies, received = [], 0
    for s in streams:
        for at, data in s.events:
            written = writes.get((data.get("job_id"), data.get("progress"))) \
                if data.get("stem") == "guitar" and data.get("status") == "running" else None
            if written is not None:
                latencies.append(1000 * (at - written))
                received += 1
    result["latencies_ms"] = latencies
    result["expected"] = sum(1 for s in streams for (job_id, _) in writes if job_id == s.job_id)
    result["received"] = received

    from tasks.jobstore import JobStore

    store = JobStore(url)
    finished = time.time()
    for job_id in job_ids:
        store.finish(job_id, "completed", {"error": None})
    await asyncio.wait_for(asyncio.gather(*tasks), 60)
    result["close_seconds"] = max(s.closed_at for s in streams) - finished
    result["closed"] = sum(1 for s in streams if s.events and s.events[-1][1].get("status") == "completed")
    return result


def flush(dbs: tuple[int, int]) -> None:
    import redis

    for db in dbs:
        redis.Redis.from_url(f"{REDIS}/{db}").flushdb()


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench.events", description=__doc__.split("\n")[0])
    p.add_argument("--streams", type=int, default=500, help="SSE connections held open (500)")
    p.add_argument("--jobs", type=int, default=None, help="jobs they watch (default: one per stream)")
    p.add_argument("--rate", type=float, default=500.0, help="progress changes per second, all jobs (500)")
    p.add_argument("--seconds", type=float, default=20.0, help="measured load duration (20)")
    p.add_argument("--idle-seconds", type=float, default=5.0, help="idle window before the load (5)")
    p.add_argument("--workers", type=int, default=None, help="GUNICORN_WORKERS (default: the config's)")
    p.add_argument("--broker-db", type=int, default=10, help="Redis DB of the broker (10)")
    p.add_argument("--result-db", type=int, default=11, help="Redis DB of the job store (11)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    n_jobs = args.jobs or args.streams
    key = secrets.token_hex(16)
    url = f"{REDIS}/{args.result_db}"
    env = dict(os.environ)
    env.update({"BROKER_URL": f"{REDIS}/{args.broker_db}", "RESULT_BACKEND": url,
                "STEMGEN_API_KEYS": key, "USER": env.get("USER", "stemgen")})
    if args.workers is not None:
        env["GUNICORN_WORKERS"] = str(args.workers)
    dbs = (args.broker_db, args.result_db)
    flush(dbs)
    from tasks.jobstore import JobStore

    store = JobStore(url)
    job_ids = []
    for i in range(n_jobs):
        job_id = store.create({"generation_request_id": f"bench-events-{i}", "audio_file_id": "a",
                               "target_stems": ["guitar"], "parameters": {}}, ["guitar"], None).job_id
        store.update_stem(job_id, "guitar", "running", 0.0)  # queued → running: in the backlog
        job_ids.append(job_id)
    workdir = Path(tempfile.mkdtemp(prefix="stemgen-events-bench-"))
    proc, base = start_gateway("api:create_app()", env, workdir / "gunicorn.log")
    try:
        workers = children(proc.pid)
        print(f"gateway: gunicorn {env.get('GUNICORN_WORKER_CLASS', 'gevent')} "
              f"({len(workers)} worker processes), Redis DBs {dbs[0]}/{dbs[1]}, {os.cpu_count()} cores, "
              f"load average {os.getloadavg()[0]:.2f}")
        result = asyncio.run(run(args, int(base.rsplit(":", 1)[1]), key, job_ids, workers, url, workdir))
    finally:
        stop(proc)
        flush(dbs)
    lat = result["latencies_ms"]
    print(f"streams: {args.streams} over {n_jobs} jobs, all receiving after {result['connect_seconds']:.2f} s; "
          f"errors: {len(result['errors'])} {result['errors'][:3]}")
    print(f"idle ({args.idle_seconds:g} s, streams open, no events): gateway CPU "
          f"{100 * result['idle_cpu']:.1f} % of one core")
    print(f"load: {result['writes']} progress changes in {result['load_seconds']:.2f} s "
          f"({result['writes'] / result['load_seconds']:.0f}/s); events expected {result['expected']}, "
          f"received {result['received']}; streams still open at the end: "
          f"{result['open_after_load']}/{args.streams}")
    print(f"latency ms (change written -> event read): p50 {percentile(lat, 50):.2f}  "
          f"p90 {percentile(lat, 90):.2f}  p99 {percentile(lat, 99):.2f}  max {max(lat, default=0):.2f}")
    cpu = result["load_cpu_seconds"]
    print(f"gateway CPU under load: {cpu:.2f} s in {result['load_seconds']:.2f} s = "
          f"{100 * cpu / result['load_seconds']:.1f} % of one core, "
          f"{1000 * cpu / max(result['received'], 1):.3f} ms per event delivered")
    print(f"final state: {result['closed']}/{args.streams} streams got it and closed within "
          f"{result['close_seconds']:.2f} s")
    print(f"events_p50_ms={percentile(lat, 50):.2f} events_p99_ms={percentile(lat, 99):.2f} "
          f"gateway_cpu_pct={100 * cpu / result['load_seconds']:.1f}")
    return 0 if result["received"] == result["expected"] and not result["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
