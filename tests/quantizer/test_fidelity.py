"""sqnr_db, top1_agreement and measure_latency_ms against hand-computed numbers."""

from __future__ import annotations

import math
import time

import pytest
import torch
from torch import nn

from quantizer.fidelity import flatten_outputs, measure_latency_ms, sqnr_db, top1_agreement


def test_sqnr_matches_the_definition():
    reference = torch.ones(100)  # ||ref|| = 10
    assert sqnr_db(reference, reference + 0.1) == pytest.approx(20.0, abs=1e-4)  # ||noise|| = 1
    assert sqnr_db(reference, reference + 0.01) == pytest.approx(40.0, abs=1e-3)
    assert sqnr_db(reference, reference.clone()) == math.inf
    assert sqnr_db(torch.zeros(4), torch.ones(4)) == -math.inf


def test_sqnr_pools_every_output_tensor_and_casts_to_float32():
    a, b = torch.ones(50), torch.ones(50)
    pooled = sqnr_db({"logits": a, "aux": (b,)}, {"aux": (b + 0.1,), "logits": a + 0.1})
    assert pooled == pytest.approx(20.0, abs=1e-4)
    half = sqnr_db(torch.ones(100), (torch.ones(100) + 0.125).half())  # exact in fp16
    assert half == pytest.approx(20 * math.log10(10 / 1.25), abs=1e-4)


def test_sqnr_refuses_mismatched_outputs():
    with pytest.raises(ValueError, match="shape"):
        sqnr_db(torch.ones(4, 2), torch.ones(2, 4))
    with pytest.raises(ValueError, match="structure"):
        sqnr_db((torch.ones(2), torch.ones(2)), torch.ones(2))


def test_flatten_outputs_order_and_refusal():
    a, b, c = torch.zeros(1), torch.ones(1), torch.full((1,), 2.0)
    assert flatten_outputs([a, {"z": c, "y": b}]) == [a, b, c]
    with pytest.raises(TypeError, match="str"):
        flatten_outputs(("not a tensor",))


def test_top1_agreement_counts_rows():
    reference = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    test = torch.tensor([[0.8, 0.2], [0.1, 0.9], [0.4, 0.6], [0.2, 0.8]])  # row 2 flips
    assert top1_agreement(reference, test) == pytest.approx(0.75)
    # tuples: the first tensor decides; fp16 outputs compare directly
    assert top1_agreement((reference, torch.ones(3)), (test.half(), torch.zeros(3))) == 0.75


class _Sleeper(nn.Module):
    def __init__(self, seconds: float):
        super().__init__()
        self.seconds = seconds
        self.calls = 0
        self.in_inference_mode = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.in_inference_mode.append(torch.is_inference_mode_enabled())
        time.sleep(self.seconds)
        return x


def test_latency_is_the_median_of_timed_runs_after_warmup():
    model = _Sleeper(0.02)
    ms = measure_latency_ms(model, torch.zeros(1), warmup=2, repeats=5, budget_s=10.0)
    assert 20.0 <= ms < 60.0
    assert model.calls == 7
    assert all(model.in_inference_mode)


def test_latency_stops_at_the_budget_but_times_at_least_once():
    model = _Sleeper(0.2)
    ms = measure_latency_ms(model, (torch.zeros(1),), warmup=2, repeats=10, budget_s=0.3)
    assert ms >= 200.0
    assert model.calls == 3  # two warm-ups started within budget, then the one guaranteed timed run
    model = _Sleeper(0.05)
    measure_latency_ms(model, torch.zeros(1), warmup=5, repeats=10, budget_s=0.0)
    assert model.calls == 1
