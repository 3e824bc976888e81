"""A worker starts without warnings: no xFormers extension that cannot load (stems.xformers_stand_in),
no deprecation from audiocraft's model building. (The CLI's start: tests/stems/test_cli.py.)"""

import os
import re

from tests.harness import service_env, start_worker

#: Celery warns when its worker runs as root (tests in CI do; the image runs as uid 10001).
ROOT_WARNING = re.compile(r"^.*SecurityWarning: You're running the worker with superuser privileges"
                          r".*?_warn_or_raise_security_error\(.*?$", re.S | re.M)


def test_worker_start_prints_no_warning(tmp_path):
    worker = start_worker(service_env(tmp_path), tmp_path, name="clean")
    try:
        log = worker.log()
    finally:
        worker.stop()
    start = log[:log.index("ready.")]
    if os.geteuid() == 0:
        start = ROOT_WARNING.sub("", start, count=1)
    warnings = [line for line in start.splitlines() if re.search(r"warn", line, re.I)]
    assert warnings == [], start
