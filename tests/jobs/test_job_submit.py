"""``ray job submit`` against a real Ray head on loopback: the command joins the cluster.

The head runs as ``ray start --head --block`` in a subprocess with its own temporary dir; ending
that one process (by its PID) stops the head and everything it started, without touching any
other Ray on the machine. Ray 2.60 enables token auth: the CLI reads the token the head wrote
(``~/.ray/auth_token``) when ``RAY_AUTH_MODE=token`` is set, which is what users do too.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except urllib.error.HTTPError:
            return  # it answers (401 until a token is sent: token auth is on)
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout} s")


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """A Ray head with its dashboard (the job server) on 127.0.0.1, stopped by PID."""
    temp = Path("/tmp") / f"qa-head-{os.getpid()}"   # Ray wants a short path (unix sockets)
    gcs, dash = free_port(), free_port()
    # Own ports for every agent: another Ray in this process (the session's) holds the defaults,
    # and a head whose agent cannot bind answers "No available agent to submit job".
    agents = [f"--{flag}={free_port()}" for flag in (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
        "runtime-env-agent-port", "ray-client-server-port")]
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", RAY_AUTH_MODE="token")
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--port={gcs}", "--num-cpus=2",
         "--node-ip-address=127.0.0.1", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dash}", f"--temp-dir={temp}", "--disable-usage-stats", *agents],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{dash}/api/version", 90)
        yield {"address": f"http://127.0.0.1:{dash}", "env": env}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)   # the head's own process group only
            proc.wait()
        shutil.rmtree(temp, ignore_errors=True)


def submit(head, working_dir: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [str(BIN / "ray"), "job", "submit", "--address", head["address"],
           "--working-dir", str(working_dir), "--", "quantize-all", *args]
    deadline = time.monotonic() + 60
    while True:
        done = subprocess.run(cmd, env=head["env"], capture_output=True, text=True, timeout=600)
        # The job server answers before the head's agent is up: Ray says to try again later.
        if "No available agent" not in done.stderr + done.stdout or time.monotonic() > deadline:
            return done
        time.sleep(2)


def test_job_submit_joins_the_cluster(ray_local, head, demo_copy, tmp_path):
    # ray_local: the session's Ray runs beside the head, as in the full suite
    out = tmp_path / "out"
    done = submit(head, demo_copy, "zoo.yaml", "--out", str(out), "--json")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads(done.stdout[done.stdout.index("{\n"):done.stdout.rindex("}") + 1])
    assert summary["counts"] == {"ok": 7, "failed": 0, "skipped": 0}
    # Inside a job RAY_ADDRESS is set: the command joined the head instead of starting a Ray.
    assert summary["ray_used"] is True and summary["ray_mode"] == "joined"
    rows = json.loads((out / "manifest.json").read_text())["rows"]
    assert len(rows) == 7 and all(r["status"] == "ok" for r in rows)
    nodes = {r["node"].split("/")[1] for r in rows}
    assert len(nodes) == 1
    again = submit(head, demo_copy, "zoo.yaml", "--out", str(out), "--json")
    assert again.returncode == 0
    assert '"skipped": 7' in again.stdout
