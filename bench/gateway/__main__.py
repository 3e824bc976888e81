"""``python -m bench.gateway``: accepted ``POST /generate`` per second and latency percentiles.

Starts the gateway as production does (``gunicorn -c deploy/gunicorn.conf.py 'api:create_app()'``)
on a free loopback port, against Redis DBs 10 (broker) and 11 (result backend / job store), both
flushed before and after; drives it with wrk (``apt-get install -y wrk``) and bench/gateway/
generate.lua, which sends a unique generation_request_id per request so every request records a
new job (and its outbox entry). No worker runs: the outbox just fills (and is flushed).

    python -m bench.gateway                          # 20 s, 32 connections
    python -m bench.gateway --profile /tmp/gw.txt    # also py-spy the gunicorn workers
    python -m bench.gateway --durability none,everysec,always,replica --rounds 2
                                                     # the price of each Redis durability setting

``--durability`` measures, in one run and alternating, the gateway against a redis-server of its
own per setting (data in a temporary directory on the disk of /tmp): ``none`` (no persistence),
``everysec`` (append-only file fsynced once a second), ``always`` (deploy/local/redis-durable.conf,
the shipped setting: fsynced before each answer), ``replica`` (a primary and one replica, both
``everysec``, the job store URL with ``wait_replicas=1``: every write waits for the replica).
Before each gateway run it also times 300 ``JobStore.create`` calls from one client, one after
another: the latency each setting adds to an accepted job, with little of the box's CPU in it.

Prints requests/s, accepted (202) requests/s, p50/p90/p99 latency, the gateway's CPU time per
request (gunicorn workers' user+system time over the measured run), and the gunicorn settings used.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LUA = Path(__file__).with_name("generate.lua")
REDIS = "redis://127.0.0.1:6379"
BROKER_DB, RESULT_DB = 10, 11
TARGET_RPS, TARGET_P99_MS = 1000.0, 50.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flush_redis(base: str = REDIS) -> None:
    import redis

    for db in (BROKER_DB, RESULT_DB):
        redis.Redis.from_url(f"{base}/{db}").flushdb()


def outbox_size(result_backend: str = f"{REDIS}/{RESULT_DB}") -> int:
    from tasks.jobstore import JobStore

    return JobStore(result_backend).outbox_backlog()[0]


#: --durability settings: redis-server arguments of the primary, and whether a replica is attached
#: and waited for (the job store URL then carries wait_replicas=1).
DURABILITY = {
    "none": (["--appendonly", "no"], False),
    "everysec": (["--appendonly", "yes", "--appendfsync", "everysec"], False),
    "always": ([str(ROOT / "deploy" / "local" / "redis-durable.conf")], False),
    "replica": (["--appendonly", "yes", "--appendfsync", "everysec"], True),
}


class OwnRedis:
    """redis-server processes of one --durability setting (a primary, and maybe one replica), each
    on a free loopback port with its data in a temporary directory; ``url`` is the primary's."""

    def __init__(self, mode: str):
        self.mode = mode
        self.dir = Path(tempfile.mkdtemp(prefix=f"stemgen-bench-redis-{mode}-"))
        self.procs: list[subprocess.Popen] = []
        args, self.replicated = DURABILITY[mode]
        self.port = self._start("primary", args)
        if self.replicated:
            self._start("replica", ["--appendonly", "yes", "--appendfsync", "everysec",
                                    "--replicaof", "127.0.0.1", str(self.port)])
            self._wait_replica()
        self.url = f"redis://127.0.0.1:{self.port}"

    def _start(self, name: str, args: list[str]) -> int:
        port = free_port()
        data = self.dir / name
        data.mkdir()
        # a config file must come first on redis-server's command line, then the flags
        if args and args[0].endswith(".conf"):  # a copy: CONFIG REWRITE would rewrite the file
            args = [shutil.copy(args[0], data / "redis.conf"), *args[1:]]
        cmd = ["redis-server", *args, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data),
               "--save", "", "--protected-mode", "no", "--logfile", str(data / "redis.log")]
        self.procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                                           start_new_session=True))
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return port
            time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"redis-server ({self.mode} {name}) did not listen within 20 s")

    def _wait_replica(self) -> None:
        import redis

        primary = redis.Redis(port=self.port)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            slaves = [v for k, v in primary.info("replication").items() if k.startswith("slave")]
            if slaves and isinstance(slaves[0], dict) and slaves[0].get("state") == "online":
                return
            time.sleep(0.2)
        self.stop()
        raise TimeoutError("the replica did not come online within 30 s")

    def result_backend(self) -> str:
        return f"{self.url}/{RESULT_DB}" + ("?wait_replicas=1&wait_timeout_ms=1000" if self.replicated else "")

    def stop(self) -> None:
        for proc in reversed(self.procs):
            stop(proc)
        shutil.rmtree(self.dir, ignore_errors=True)


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of the processes so far (/proc/PID/stat fields 14 and 15)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


def start_gateway(app: str, env: dict, log: Path) -> tuple[subprocess.Popen, str]:
    """gunicorn serving ``app`` (e.g. "api:create_app()") with deploy/gunicorn.conf.py on a free
    loopback port, its output in ``log``; returns (process, base URL) once /health/live answers.

    Raises:
        RuntimeError: gunicorn exited. TimeoutError: no answer within 60 s.
    """
    port = free_port()
    cmd = [str(Path(sys.executable).parent / "gunicorn"), "-c", "deploy/gunicorn.conf.py",
           "--bind", f"127.0.0.1:{port}", app]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"gunicorn exited:\n{log.read_text(errors='replace')[-3000:]}")
        try:
            with urllib.request.urlopen(f"{base}/health/live", timeout=1) as r:
                if r.status == 200:
                    return proc, base
        except OSError:
            time.sleep(0.2)
    stop(proc)
    raise TimeoutError("gunicorn did not answer /health/live within 60 s")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def run_wrk(args, base: str, seconds: float, env: dict, run_id: str) -> dict:
    cmd = ["wrk", "-t", str(args.wrk_threads), "-c", str(args.connections), "-d", f"{seconds:g}s",
           "--timeout", "5s", "-s", str(LUA), f"{base}/generate"]
    out = subprocess.run(cmd, env={**env, "STEMGEN_BENCH_RUN": run_id}, capture_output=True,
                         text=True, timeout=seconds + 60)
    if out.returncode != 0:
        raise RuntimeError(f"wrk failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    result: dict = {"statuses": {}, "raw": out.stdout}
    for line in out.stdout.splitlines():
        if not line.startswith("STEMGEN "):
            continue
        if line.startswith("STEMGEN status "):
            code, n = line.split()[-1].split("=")
            result["statuses"][code] = int(n)
            continue
        for key, value in re.findall(r"(\w+(?:\.\d+)?)=([\d.]+)", line):
            result[key] = float(value)
    return result


def gunicorn_pids(master: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(master)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def start_profile(args, master: int, seconds: float) -> subprocess.Popen | None:
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(py_spy).exists():
        print("profile: py-spy not found (pip install py-spy); skipped")
        return None
    return subprocess.Popen([py_spy, "record", "--pid", str(master), "--subprocesses", "--format", "raw",
                             "--rate", "200", "--duration", str(int(seconds)), "--nonblocking",
                             "--output", args.profile], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def summarize_profile(path: str, top: int = 20) -> None:
    """Self and inclusive shares of the sampled gunicorn worker stacks (py-spy raw format)."""
    own: collections.Counter = collections.Counter()
    inclusive: collections.Counter = collections.Counter()
    total = 0
    for line in Path(path).read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [f for f in stack.split(";") if not f.startswith("process ")]
        if not frames:
            continue
        total += n
        own[_short(frames[-1])] += n
        for frame in {_short(f) for f in frames}:
            inclusive[frame] += n
    if not total:
        print("profile: no samples")
        return
    print(f"profile ({total} samples of the gunicorn workers, {path}):")
    print("  self time (leaf frames):")
    for frame, n in own.most_common(top):
        print(f"    {100 * n / total:5.1f}%  {frame}")
    print("  inclusive (frames on the stack), stemgen/celery/kombu/redis/flask/pydantic/gunicorn:")
    keep = re.compile(r"(api/|tasks/|celery/|kombu/|redis/|flask/|werkzeug/|pydantic|gunicorn/)")
    shown = 0
    for frame, n in inclusive.most_common():
        if keep.search(frame):
            print(f"    {100 * n / total:5.1f}%  {frame}")
            shown += 1
            if shown >= top:
                break


def _short(frame: str) -> str:
    # "function (path/to/site-packages/pkg/module.py:123)" -> "function (pkg/module.py:123)"
    return re.sub(r"\(.*?(?:site-packages/|/work/main/)", "(", frame)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench.gateway", description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=20.0, help="measured load duration (20, max 30)")
    p.add_argument("--warmup", type=float, default=3.0, help="unmeasured load before (3 s)")
    p.add_argument("--connections", type=int, default=32, help="wrk connections (32)")
    p.add_argument("--wrk-threads", type=int, default=1, help="wrk threads (1; the box has 2 cores)")
    p.add_argument("--workers", type=int, default=None, help="GUNICORN_WORKERS (default: the config's)")
    p.add_argument("--threads", type=int, default=None, help="GUNICORN_THREADS (default: the config's)")
    p.add_argument("--worker-class", default=None,
                   help="GUNICORN_WORKER_CLASS (default: the config's)")
    p.add_argument("--access-log", default=None,
                   help="GUNICORN_ACCESSLOG (default: the config's; '' turns it off)")
    p.add_argument("--gc-freeze", default=None, choices=("true", "false"),
                   help="GUNICORN_GC_FREEZE (default: the config's, true)")
    p.add_argument("--log-level", default=None, help="LOG_LEVEL of the app (default: settings)")
    p.add_argument("--app", default="api:create_app()",
                   help="WSGI app gunicorn serves (default: api:create_app(); for trying variants)")
    p.add_argument("--durability", default=None, metavar="MODES",
                   help="comma-separated Redis settings to measure in this run, each against its "
                        f"own redis-server: {', '.join(DURABILITY)} (default: the shared Redis)")
    p.add_argument("--rounds", type=int, default=1,
                   help="with --durability: measure every setting this many times, alternating (1)")
    p.add_argument("--profile", default=None, metavar="PATH",
                   help="record the gunicorn workers with py-spy (raw stacks to PATH) and summarize")
    args = p.parse_args(argv)
    args.seconds = min(args.seconds, 30.0)
    unknown = set((args.durability or "").replace(" ", "").split(",")) - set(DURABILITY) - {""}
    if unknown:
        p.error(f"unknown --durability setting(s) {sorted(unknown)}; known: {', '.join(DURABILITY)}")
    return args


def measure(args, env: dict, base_url: str = REDIS, result_backend: str | None = None) -> dict:
    """One measured run of the gateway against the Redis at ``base_url`` (DBs 10/11, flushed
    before and after); prints the run's report and returns its figures."""
    result_backend = result_backend or f"{base_url}/{RESULT_DB}"
    env = dict(env, BROKER_URL=f"{base_url}/{BROKER_DB}", RESULT_BACKEND=result_backend)
    flush_redis(base_url)
    workdir = Path(tempfile.mkdtemp(prefix="stemgen-gateway-bench-"))
    proc, base = start_gateway(args.app, env, workdir / "gunicorn.log")
    try:
        workers = gunicorn_pids(proc.pid)
        config = subprocess.run(
            [sys.executable, "-c", "import runpy; c = runpy.run_path('deploy/gunicorn.conf.py'); "
             "print(c['workers'], c['threads'] if c['worker_class'] == 'gthread' else '-', "
             "c['worker_class'], repr(c.get('accesslog')), c['gc_freeze'])"],
            cwd=ROOT, env=env, capture_output=True, text=True).stdout.split()
        print(f"gateway: gunicorn {' '.join(config[2:3])} workers={config[0]} threads={config[1]} "
              f"accesslog={config[3] if len(config) > 3 else '?'} "
              f"gc_freeze={config[4] if len(config) > 4 else '?'} ({len(workers)} worker processes), "
              f"broker/result Redis DBs {BROKER_DB}/{RESULT_DB} at {base_url}, {os.cpu_count()} cores, "
              f"load average {os.getloadavg()[0]:.2f}")
        if args.warmup > 0:
            run_wrk(args, base, args.warmup, env, f"warm{secrets.token_hex(3)}")
        profiler = start_profile(args, proc.pid, args.seconds) if args.profile else None
        cpu_before = cpu_seconds(workers)
        result = run_wrk(args, base, args.seconds, env, f"m{secrets.token_hex(3)}")
        cpu_used = cpu_seconds(workers) - cpu_before
        if profiler is not None:
            profiler.wait(60)
        queued = outbox_size(result_backend)
    finally:
        stop(proc)
        flush_redis(base_url)
    seconds = result.get("seconds", args.seconds)
    rps = result.get("requests", 0) / seconds
    accepted_rps = result.get("accepted", 0) / seconds
    p99 = result.get("p99", float("nan"))
    print(f"load: wrk -t{args.wrk_threads} -c{args.connections} -d{args.seconds:g}s POST /generate "
          f"(3 stems each), after {args.warmup:g}s warm-up")
    print(f"requests: {int(result.get('requests', 0))} in {seconds:.2f}s = {rps:.1f} req/s; accepted (202): "
          f"{int(result.get('accepted', 0))} = {accepted_rps:.1f} req/s; other answers: "
          f"{result['statuses'] or 0}; socket errors: connect {int(result.get('connect', 0))} "
          f"read {int(result.get('read', 0))} write {int(result.get('write', 0))} "
          f"timeout {int(result.get('timeout', 0))}")
    print(f"latency ms: p50 {result.get('p50', 0):.2f}  p90 {result.get('p90', 0):.2f}  "
          f"p99 {p99:.2f}  p99.9 {result.get('p99.9', 0):.2f}  max {result.get('max', 0):.2f}")
    requests = result.get("requests", 0)
    cpu_ms = 1000 * cpu_used / requests if requests else float("nan")
    if requests:
        print(f"gateway CPU: {cpu_used:.2f} s over {len(workers)} worker processes = "
              f"{cpu_ms:.3f} ms per request")
    print(f"jobs waiting in the outbox (no worker runs; flushed): {queued}")
    print(f"target: >= {TARGET_RPS:g} accepted req/s with p99 <= {TARGET_P99_MS:g} ms: "
          f"{'met' if accepted_rps >= TARGET_RPS and p99 <= TARGET_P99_MS else 'NOT met'}")
    if args.profile and Path(args.profile).exists():
        summarize_profile(args.profile)
    return {"accepted_rps": accepted_rps, "p50": result.get("p50", 0.0), "p99": p99,
            "cpu_ms": cpu_ms, "queued": queued, "accepted": int(result.get("accepted", 0))}


def create_latency(result_backend: str, count: int = 300) -> dict:
    """Milliseconds one ``JobStore.create`` takes, one client, one job after another (no gateway):
    what each durability setting adds to an accepted job, with the box's CPU mostly out of it."""
    from tasks.jobstore import JobStore

    store = JobStore(result_backend, 600)
    seconds = []
    for _ in range(count):
        request = {"generation_request_id": f"latency-{secrets.token_hex(8)}", "audio_file_id": "a",
                   "target_stems": ["bass"], "parameters": {"target_bpm": 120.0}}
        started = time.perf_counter()
        store.create(request, ["bass"], None)
        seconds.append(time.perf_counter() - started)
    seconds.sort()
    return {"create_p50": 1000 * seconds[len(seconds) // 2],
            "create_p99": 1000 * seconds[int(len(seconds) * 0.99)]}


def measure_durability(args, env: dict) -> None:
    """--durability: each setting against its own redis-server, alternating over ``rounds``; a
    table of the medians at the end."""
    modes = [m.strip() for m in args.durability.split(",") if m.strip()]
    runs: dict[str, list[dict]] = {mode: [] for mode in modes}
    for round_ in range(args.rounds):
        for mode in modes:
            print(f"\n=== durability {mode} (round {round_ + 1}/{args.rounds}) ===")
            own = OwnRedis(mode)
            try:
                latency = create_latency(own.result_backend())
                print(f"one client, JobStore.create: p50 {latency['create_p50']:.3f} ms, "
                      f"p99 {latency['create_p99']:.3f} ms")
                runs[mode].append({**measure(args, env, own.url, own.result_backend()), **latency})
            finally:
                own.stop()
    print(f"\ndurability (median of {args.rounds} run(s) each, {args.seconds:g} s, "
          f"{args.connections} connections; Redis data on {_filesystem(tempfile.gettempdir())}):")
    print(f"  {'setting':<10} {'accepted req/s':>15} {'p50 ms':>8} {'p99 ms':>8} {'CPU ms/req':>11} "
          f"{'create p50/p99 ms':>18}")
    baseline = None
    machine = []
    for mode in modes:
        med = {k: statistics.median(r[k] for r in runs[mode])
               for k in ("accepted_rps", "p50", "p99", "cpu_ms", "create_p50", "create_p99")}
        baseline = baseline or med["accepted_rps"]
        each = ", ".join(f"{r['accepted_rps']:.0f}" for r in runs[mode])
        print(f"  {mode:<10} {med['accepted_rps']:>15.1f} {med['p50']:>8.2f} {med['p99']:>8.2f} "
              f"{med['cpu_ms']:>11.3f} {med['create_p50']:>8.3f}/{med['create_p99']:<9.3f}   ({100 * med['accepted_rps'] / baseline - 100:+.0f} % vs {modes[0]}; "
              f"runs: {each})")
        machine.append(f"durability_{mode}_rps={med['accepted_rps']:.1f} "
                       f"durability_{mode}_p99_ms={med['p99']:.2f}")
    print("\n".join(machine))


def _filesystem(path: str) -> str:
    out = subprocess.run(["df", "--output=source,fstype", path], capture_output=True, text=True).stdout
    return " ".join(out.split()[2:4]) or "?"


def main(argv=None) -> int:
    args = parse_args(argv)
    if not shutil.which("wrk"):
        print("wrk not found: apt-get install -y wrk", file=sys.stderr)
        return 2
    key = secrets.token_hex(16)
    env = dict(os.environ)
    env.update({"STEMGEN_API_KEYS": key, "STEMGEN_BENCH_KEY": key, "USER": env.get("USER", "stemgen"),
                # the body names a loopback callback_url: no DNS look-up per request in the bench
                "CALLBACK_ALLOW_LOOPBACK": "true"})
    for name, value in (("GUNICORN_WORKERS", args.workers), ("GUNICORN_THREADS", args.threads),
                        ("GUNICORN_WORKER_CLASS", args.worker_class),
                        ("GUNICORN_ACCESSLOG", args.access_log), ("GUNICORN_GC_FREEZE", args.gc_freeze),
                        ("LOG_LEVEL", args.log_level)):
        if value is not None:
            env[name] = str(value)
    if args.durability:
        measure_durability(args, env)
        return 0
    result = measure(args, env)
    print(f"gateway_rps={result['accepted_rps']:.1f} p99_ms={result['p99']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
