"""examples/schedule/: the cron, systemd and Kubernetes examples parse and keep their key settings."""

from __future__ import annotations

import configparser
import fcntl
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import ray
import yaml

ROOT = Path(__file__).resolve().parents[2]
SCHEDULE = ROOT / "examples" / "schedule"

# SPEC section 4: the only options quantize-all has.
SPEC_OPTIONS = {"--out", "-o", "--precision", "--backend", "--calibration-batches", "--only",
                "--address", "--num-cpus", "--max-retries", "--force", "--dry-run", "--verify",
                "--json", "--allow-unsafe-pickle"}
CRON_RANGES = [(0, 59), (0, 23), (1, 31), (1, 12), (0, 7)]


def cron_field_ok(field: str, low: int, high: int) -> bool:
    """One field of a 5-field cron schedule: *, N, N-M, lists and /step."""
    for part in field.split(","):
        m = re.fullmatch(r"(\*|(\d+)(?:-(\d+))?)(?:/(\d+))?", part)
        if not m:
            return False
        numbers = [int(n) for n in m.group(2, 3) if n is not None]
        if any(not low <= n <= high for n in numbers) or (m.group(4) and int(m.group(4)) < 1):
            return False
    return True


def assert_quantize_all_command(args: list[str]) -> None:
    """``args`` runs quantize-all ZOO --out DEST with options from SPEC section 4 only."""
    start = next(i for i, a in enumerate(args) if a.split("/")[-1] == "quantize-all")
    zoo, *options = args[start + 1:]
    assert zoo.endswith((".yaml", ".yml")), args
    assert "--out" in options and options[options.index("--out") + 1].startswith("s3://")
    flags = {o for o in options if o.startswith("-")}
    assert flags <= SPEC_OPTIONS, flags - SPEC_OPTIONS


def load_one(name: str) -> dict:
    (doc,) = [d for d in yaml.safe_load_all((SCHEDULE / name).read_text()) if d]
    return doc


def test_cron_schedule_checker_rejects_bad_fields():
    assert cron_field_ok("*/15", 0, 59) and cron_field_ok("1-5", 0, 7)
    assert not cron_field_ok("60", 0, 59) and not cron_field_ok("*/0", 0, 59)
    assert not cron_field_ok("mon", 0, 7)


def test_crontab_runs_quantize_all_under_flock():
    jobs = []
    for line in (SCHEDULE / "crontab").read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if re.match(r"[A-Za-z_]\w*=", line):        # environment assignment (PATH=..., ...)
            continue
        jobs.append(line)
    assert len(jobs) == 1, jobs
    *fields, command = jobs[0].split(None, 5)
    assert len(fields) == 5
    assert all(cron_field_ok(f, lo, hi) for f, (lo, hi) in zip(fields, CRON_RANGES)), fields
    assert "%" not in command                       # cron would turn it into a newline
    args = shlex.split(command)
    assert args[:2] == ["flock", "-n"]
    assert args[args.index("-E") + 1] == "3"         # a skipped run exits like a held DEST lock
    assert_quantize_all_command(args[:next(i for i, a in enumerate(args) if a.startswith(">"))])


def read_unit(name: str) -> configparser.ConfigParser:
    unit = configparser.ConfigParser(interpolation=None, strict=False)
    unit.optionxform = str                          # systemd keys are case-sensitive
    unit.read_string((SCHEDULE / name).read_text())
    return unit


def test_systemd_timer_and_service():
    timer, service = read_unit("quantize-all.timer"), read_unit("quantize-all.service")
    assert re.fullmatch(r"\*-\*-\* \d\d:\d\d(:\d\d)?", timer["Timer"]["OnCalendar"])
    assert timer["Timer"]["Persistent"] == "true"
    assert timer["Timer"].get("Unit", "quantize-all.service") == "quantize-all.service"
    assert timer["Install"]["WantedBy"] == "timers.target"
    assert service["Service"]["Type"] == "oneshot"   # active while it runs: no overlap on a host
    assert "3" in service["Service"]["SuccessExitStatus"].split()
    assert_quantize_all_command(shlex.split(service["Service"]["ExecStart"]))


def test_kubernetes_cronjob_forbids_overlap():
    cron = load_one("kubernetes-cronjob.yaml")
    assert (cron["apiVersion"], cron["kind"]) == ("batch/v1", "CronJob")
    spec = cron["spec"]
    assert spec["concurrencyPolicy"] == "Forbid"
    assert len(spec["schedule"].split()) == 5
    job = spec["jobTemplate"]["spec"]
    pod = job["template"]["spec"]
    assert pod["restartPolicy"] == "Never"           # required by podFailurePolicy
    (container,) = pod["containers"]
    assert_quantize_all_command(container["command"])
    no_retry = [r for r in job["podFailurePolicy"]["rules"] if r["action"] == "FailJob"]
    codes = no_retry[0]["onExitCodes"]
    assert codes["containerName"] == container["name"]
    assert set(codes["values"]) == {1, 2, 3}         # exit 4 (unreachable) is retried


def test_kuberay_raycronjob_runs_quantize_all_and_ends_before_the_next_tick():
    cron = load_one("kuberay-raycronjob.yaml")
    assert (cron["apiVersion"], cron["kind"]) == ("ray.io/v1", "RayCronJob")
    minute, hour, *rest = cron["spec"]["schedule"].split()
    assert minute.isdigit() and hour.isdigit() and rest == ["*", "*", "*"]  # once a day
    job = cron["spec"]["jobTemplate"]
    assert_quantize_all_command(shlex.split(job["entrypoint"]))
    assert job["shutdownAfterJobFinishes"] is True
    assert 0 < job["activeDeadlineSeconds"] < 24 * 3600
    assert job["rayClusterSpec"]["rayVersion"] == ray.__version__
    assert "concurrencyPolicy" not in cron["spec"]   # RayCronJob has none: the README says so
    readme = (SCHEDULE / "README.md").read_text()
    assert "no concurrency policy" in readme and "exits 3" in readme


@pytest.mark.parametrize("name", ["crontab", "quantize-all.service", "kubernetes-cronjob.yaml",
                                  "kuberay-raycronjob.yaml", "README.md"])
def test_every_quantize_all_flag_in_the_examples_exists(name):
    text = (SCHEDULE / name).read_text()
    for line in text.splitlines():
        if "quantize-all " in line and " --" in line:
            after = line[line.index("quantize-all "):]
            flags = set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", after))
            assert flags <= SPEC_OPTIONS | {"--no-cache-dir", "--index-url"}, (name, line)


def test_crontab_flock_skips_a_run_while_the_lock_is_held(tmp_path):
    """The crontab's exact flock options: exit 3 at once, without starting the command."""
    if shutil.which("flock") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("flock(1) is not installed; CI must install util-linux")
        pytest.skip("flock(1) is not installed here")
    line = next(line for line in (SCHEDULE / "crontab").read_text().splitlines()
                if "flock -n" in line and not line.startswith("#"))
    args = shlex.split(line.split(None, 5)[5])
    lock_at = next(i for i, a in enumerate(args) if a.endswith(".lock"))
    lock, marker = tmp_path / "q.lock", tmp_path / "started"
    prefix = args[:lock_at] + [str(lock), "touch", str(marker)]
    with open(lock, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)             # the "previous run" still holds it
        assert subprocess.run(prefix, timeout=10).returncode == 3
        assert not marker.exists()
    assert subprocess.run(prefix, timeout=10).returncode == 0   # free again: it runs
    assert marker.exists()
