"""``jobs.task.map_chunks``: a sensitivity pass fanned out from a conversion task over Ray gives
the same per-unit results as the pass run in one process, with one chunk run by the task itself
and never more chunks than the cluster has CPUs (session Ray: 2 CPUs)."""

from __future__ import annotations

import time

import pytest
import torch

from jobs.demo.models import ResidualCNN
from quantizer import int8, sensitivity

pytestmark = pytest.mark.usefixtures("ray_local")


def _task(method: str) -> sensitivity.SensitivityTask:
    torch.manual_seed(0)
    model = ResidualCNN(width=8).eval()
    calib = torch.randn(32, 1, 8, 8)
    prepared = int8.calibrate_int8(model, [calib[:16], calib[16:]], 2, "fbgemm")
    return sensitivity.task_for("static", model, torch.randn(24, 1, 8, 8), prepared=prepared,
                                method=method)


def _in_a_task(ray, whole: sensitivity.SensitivityTask) -> list:
    """map_chunks called the way the conversion task calls it: from inside a 1-CPU Ray task."""
    from jobs import task as job_task

    @ray.remote(num_cpus=1)
    def conversion_like(pieces):
        return job_task.map_chunks(pieces)

    time.sleep(1.0)          # Ray's view of free CPUs lags about a second behind the last task
    return ray.get(conversion_like.remote(sensitivity.split_tasks(whole, 8)))


@pytest.mark.parametrize("method", ["simulate", "convert"])
def test_a_pass_fanned_out_from_a_task_equals_the_pass_in_one_process(ray_local, method):
    whole = _task(method)
    alone = {r.name: r for r in sensitivity.run_sensitivity(whole)}
    chunks = _in_a_task(ray_local, whole)
    assert 1 <= len(chunks) <= 2            # the task's own chunk, plus at most the one free CPU
    merged = sensitivity.merge_sensitivity(chunks, whole.units)
    assert [r.name for r in merged] == list(whole.units) and len(alone) >= 6
    for result in merged:
        assert result.sqnr_db == pytest.approx(alone[result.name].sqnr_db, abs=1e-3), result.name
        assert result.params == alone[result.name].params
