"""Thread sanity: every convert_task runs torch with exactly its assigned CPUs, on reused workers.

Ray starts a worker with OMP_NUM_THREADS set for its first task and then reuses it for tasks of
other sizes; a worker first used by a 1-CPU task would keep one thread for a 2-CPU task (or two
for a 1-CPU task, oversubscribing the node) unless the task resets it. The model factory below
records, inside the task, the worker's pid and torch's thread count, so the test sees both the
reuse and the count the conversion ran with.
"""

from __future__ import annotations

import json
import os
import uuid

import torch
from torch import nn

from jobs.convert import worker_facts
from jobs.manifest import Manifest
from jobs.plan import conversion_jobs, make_plan
from jobs.sources import SourceHasher
from jobs.store import Store
from jobs.zoo import load_zoo

SIZES = (1, 2, 1, 2, 2, 1, 1, 2)


class ThreadProbe(nn.Module):
    """A one-layer model that, when built (inside the task), writes its pid and thread count."""

    def __init__(self, probe_dir: str = ""):
        super().__init__()
        self.fc = nn.Linear(4, 2)
        if probe_dir:
            with open(os.path.join(probe_dir, f"{uuid.uuid4().hex}.json"), "w") as f:
                json.dump({"pid": os.getpid(), "threads": torch.get_num_threads()}, f)


def _jobs(tmp_path, probe_dir):
    torch.save(ThreadProbe().state_dict(), tmp_path / "probe.pt")
    lines = ["defaults: {precisions: [fp16]}", "models:"]
    for i in range(len(SIZES)):
        lines += [f"  - name: probe-{i}", "    factory: tests.jobs.test_threads:ThreadProbe",
                  f"    kwargs: {{probe_dir: '{probe_dir}'}}", "    checkpoint: probe.pt"]
    (tmp_path / "zoo.yaml").write_text("\n".join(lines) + "\n")
    zoo = load_zoo(tmp_path / "zoo.yaml")
    store = Store(str(tmp_path / "out"))
    manifest = Manifest.load(store)
    units = make_plan(zoo, manifest, store, SourceHasher(store), worker_facts())
    jobs = conversion_jobs(units, manifest, store.uri, "threads-test")
    return sorted(jobs, key=lambda j: j.name)


def test_tasks_use_exactly_their_cpus_on_reused_workers(ray_local, tmp_path):
    from jobs.task import convert_task

    probe_dir = tmp_path / "probes"
    probe_dir.mkdir()
    seen = []
    for cpus, job in zip(SIZES, _jobs(tmp_path, probe_dir)):
        before = set(os.listdir(probe_dir))
        (row,) = ray_local.get(convert_task.options(num_cpus=cpus).remote(job, None))["rows"]
        assert row["status"] == "ok", row["error_message"]
        assert row["threads"] == cpus, (cpus, row)
        (new,) = set(os.listdir(probe_dir)) - before
        probe = json.loads((probe_dir / new).read_text())
        assert probe["threads"] == cpus, (cpus, probe)   # what the conversion itself ran with
        seen.append((probe["pid"], cpus))
    sizes_by_pid = {}
    for pid, cpus in seen:
        sizes_by_pid.setdefault(pid, set()).add(cpus)
    # the check means something only if a worker ran tasks of both sizes
    assert any(sizes == {1, 2} for sizes in sizes_by_pid.values()), seen
