"""The Python half of `make compose-smoke` (deploy/compose/smoke.sh); standard library and PyYAML.

  render OUT            compose.yaml with deploy/compose/smoke.yaml merged in, for docker-compose 1.29
  ready URL SECONDS     wait until GET URL/health says ok with at least one worker
  request URL GATEWAY   one POST /generate; its signed callback is received on GATEWAY (the compose
                        network's gateway, on this host); checks the callback and, with --exec, that
                        every stem's URL serves its blob from inside the stack
"""

import argparse
import hashlib
import hmac
import json
import os
import queue
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def merge(base, override):
    """Mappings merge key by key; any other value in ``override`` replaces the base's."""
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for key, value in override.items():
            merged[key] = merge(base[key], value) if key in base else value
        return merged
    return override


def render(out: Path) -> None:
    import yaml

    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    smoke = yaml.safe_load((ROOT / "deploy" / "compose" / "smoke.yaml").read_text())
    compose = merge(compose, smoke)
    for key in [k for k in compose if k.startswith("x-")]:  # the anchors' source, used above
        del compose[key]
    for service in compose["services"].values():
        # Host ports may be taken (the local Azurite holds 10000): the smoke uses container addresses.
        service.pop("ports", None)
        files = []
        for entry in service.pop("env_file", []):
            path = entry["path"] if isinstance(entry, dict) else entry
            required = entry.get("required", True) if isinstance(entry, dict) else True
            if required or (ROOT / path).exists():
                files.append(path)
        if files:
            service["env_file"] = files
    class Dumper(yaml.SafeDumper):
        def ignore_aliases(self, data):  # write shared values out, not as &id001/*id001
            return True

    out.write_text("# Rendered by deploy/compose/smoke.py from compose.yaml and deploy/compose/smoke.yaml.\n"
                   + yaml.dump(compose, Dumper=Dumper, sort_keys=False))


def get_json(url: str, timeout: float = 5.0):
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {os.environ['SMOKE_API_KEY']}"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as exc:  # 503 and the like still carry a JSON body
        return exc.code, json.load(exc)


def ready(url: str, seconds: float) -> None:
    deadline, last = time.monotonic() + seconds, None
    while time.monotonic() < deadline:
        try:
            status, body = get_json(f"{url}/health")
            last = body
            if status == 200 and body.get("status") == "ok" and body.get("workers"):
                worker = body["workers"][0]
                print(f"ready: {len(body['workers'])} worker(s), {json.dumps(worker)[:300]}")
                return
        except (OSError, urllib.error.URLError, ValueError) as exc:
            last = repr(exc)
        time.sleep(1)
    sys.exit(f"not ready after {seconds:.0f} s; last answer: {last}")


class Receiver:
    """The backend's callback endpoint: records each POST and answers 200."""

    def __init__(self, host: str):
        self.received: "queue.Queue[dict]" = queue.Queue()
        received = self.received

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's naming)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                received.put({"headers": dict(self.headers), "raw": body})
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer((host, 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://{host}:{self.server.server_address[1]}/callback"


def request(url: str, gateway: str, api_key: str, secret: str, seconds: float,
            exec_prefix: list[str]) -> None:
    receiver = Receiver(gateway)
    gen_id = f"smoke-{uuid.uuid4().hex[:12]}"
    body = {  # README's request, with the receiver as callback
        "generation_request_id": gen_id, "audio_file_id": "audio-123",
        "target_stems": ["guitar", "bass", "drums"], "callback_url": receiver.url,
        "parameters": {"target_bpm": 120, "duration_seconds": 8, "style": "rock", "seed": 42,
                       "key": "E minor", "chords": ["Em", "C", "G", "D"],
                       "arrangement": "independent"},
    }
    started = time.monotonic()
    req = urllib.request.Request(f"{url}/generate", data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json",
                                          "Authorization": f"Bearer {api_key}"})
    with urllib.request.urlopen(req, timeout=30) as response:
        accepted = json.load(response)
        print(f"POST /generate: {response.status} job {accepted['job_id']} ({gen_id})")
    try:
        callback = receiver.received.get(timeout=seconds)
    except queue.Empty:
        _, job = get_json(f"{url}/jobs/{accepted['job_id']}")
        sys.exit(f"no callback after {seconds:.0f} s; job: {json.dumps(job)[:2000]}")
    elapsed = time.monotonic() - started
    headers = {k.lower(): v for k, v in callback["headers"].items()}
    expected = "sha256=" + hmac.new(secret.encode(), headers["x-stemgen-timestamp"].encode()
                                    + b"." + callback["raw"], hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, headers.get("x-stemgen-signature", "")):
        sys.exit("callback signature does not verify")
    payload = json.loads(callback["raw"])
    stems = {s["stem"]: s for s in payload.get("stems", [])}
    print(f"callback after {elapsed:.1f} s: status {payload['status']}, signature ok, stems "
          + ", ".join(f"{k}={s['status']}" for k, s in stems.items()))
    if payload["status"] != "completed" or set(stems) != set(body["target_stems"]):
        sys.exit(f"callback not completed: {json.dumps(payload)[:2000]}")
    for name, stem in stems.items():
        if exec_prefix:  # the SAS URL names the azurite service: fetch it from inside the stack
            out = subprocess.run(exec_prefix + ["curl", "-fsS", "-o", "/dev/null", "-w",
                                                "%{http_code} %{size_download}", stem["url"]],
                                 capture_output=True, text=True)
            if out.returncode != 0 or not out.stdout.startswith("200 "):
                sys.exit(f"blob {stem['blob_name']}: {out.stdout} {out.stderr}")
            print(f"blob {stem['blob_name']}: HTTP {out.stdout.split()[0]}, "
                  f"{out.stdout.split()[1]} bytes")
    print(f"request_to_callback_s={elapsed:.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("render")
    p.add_argument("out", type=Path)
    p = sub.add_parser("ready")
    p.add_argument("url")
    p.add_argument("seconds", type=float)
    p = sub.add_parser("request")
    p.add_argument("url")
    p.add_argument("gateway")
    p.add_argument("--seconds", type=float, default=600)
    p.add_argument("--exec", dest="exec_prefix", default="",
                   help="command prefix that runs a command in a stack container")
    args = parser.parse_args()
    if args.command == "render":
        render(args.out)
    elif args.command == "ready":
        ready(args.url, args.seconds)
    else:
        request(args.url, args.gateway, os.environ["SMOKE_API_KEY"],
                os.environ["SMOKE_CALLBACK_SECRET"], args.seconds, args.exec_prefix.split())


if __name__ == "__main__":
    main()
