"""Helpers of the serving tests: run a job in a subprocess, start a real server."""
from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ML = REPO / "feature_specs" / "movielens.yaml"


def run_job(name: str, *args: str, env=None, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "jobs" / name), *args], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=timeout)


def sets(overrides):
    return [a for s in overrides for a in ("--set", s)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(bundle: Path, env, log: Path, *extra: str, timeout: float = 300.0):
    """(process, base url) of jobs/serve.py once /healthz answers; its output goes to `log`."""
    import httpx

    port = free_port()
    out = open(log, "w")
    proc = subprocess.Popen([sys.executable, str(REPO / "jobs" / "serve.py"), "--bundle", str(bundle), "--port",
                             str(port), *extra], stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            if httpx.get(url + "/healthz", timeout=2.0).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.terminate()
    raise RuntimeError(f"server did not answer /healthz within {timeout}s: {log.read_text()[-2000:]}")
