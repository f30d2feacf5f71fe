"""sqnr_db (pooled and per output), top1_agreement / top1_output and measure_latency_ms against
hand-computed numbers."""

from __future__ import annotations

import math
import time

import pytest
import torch
from torch import nn

from quantizer.fidelity import (flatten_outputs, measure_latency_ms, sqnr_db, sqnr_db_per_output,
                               top1_agreement, top1_output)


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
    assert top1_agreement(reference, test.half()) == pytest.approx(0.75)  # fp16 compares directly


def test_top1_is_measured_on_the_named_output_only():
    boxes = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    scores = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    flipped = torch.tensor([[0.8, 0.2], [0.1, 0.9], [0.4, 0.6], [0.2, 0.8]])  # row 2 flips
    # MTCNN-like (box regression, face probability): the boxes all flip, the scores one row in four
    ref, got = (boxes, scores), (boxes.flip(1), flipped)
    assert top1_agreement(ref, got, output=1) == pytest.approx(0.75)
    assert top1_agreement(ref, got, output=0) == 0.0
    # dicts count in key order, like flatten_outputs
    assert top1_agreement({"prob": scores, "box": boxes}, {"prob": flipped, "box": boxes},
                          output=1) == pytest.approx(0.75)
    with pytest.raises(ValueError, match=r"no output counts as class scores.*fidelity: \{output: N\}"):
        top1_agreement(ref, got)
    with pytest.raises(ValueError, match=r"output 2 is not an output index.*0: \[4, 2\], 1: \[4, 2\]"):
        top1_agreement(ref, got, output=2)


def test_top1_along_a_class_dimension_of_a_score_map():
    # PNet-style [B, 2, H, W] face-probability maps: the class dimension is 1, rows are B*H*W
    ref = torch.zeros(2, 2, 3, 3)
    ref[:, 0] = 1.0
    got = ref.clone()
    got[1, :, 2, 2] = torch.tensor([0.0, 1.0])            # one pixel of 18 flips
    assert top1_agreement(ref, got, output=0, dim=1) == pytest.approx(17 / 18)


def test_top1_output_default_rule():
    assert top1_output(torch.zeros(4, 10)) == 0                          # one [B, C] tensor
    assert top1_output((torch.zeros(4, 10),)) == 0
    assert top1_output(torch.zeros(4, 2, 5, 5)) is None                  # a map, not [B, C]
    assert top1_output(torch.zeros(4)) is None
    assert top1_output((torch.zeros(4, 4), torch.zeros(4, 2))) is None   # two outputs: say which
    assert top1_output((torch.zeros(4, 4), torch.zeros(4, 2)), 1) == 1
    for bad in (-1, 2, True, "1"):
        with pytest.raises(ValueError, match="not an output index"):
            top1_output((torch.zeros(4, 4), torch.zeros(4, 2)), bad)


def test_sqnr_per_output_separates_what_pooling_hides():
    big, small = torch.full((100,), 100.0), torch.ones(4)
    ref, got = (big, small), (big + 0.1, small * 0.5)      # small output broken: 6.0 dB alone
    per = sqnr_db_per_output(ref, got)
    assert per[0] == pytest.approx(60.0, abs=1e-3) and per[1] == pytest.approx(6.0206, abs=1e-3)
    assert sqnr_db(ref, got) > 50.0                        # pooled, the big output drowns it
    assert sqnr_db_per_output(big, big.clone()) == [math.inf]
    with pytest.raises(ValueError, match="structure"):
        sqnr_db_per_output(ref, big)


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
