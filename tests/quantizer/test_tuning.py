"""Accuracy-gated int8 on trained tiny nets: fallback units, the simulator against real
conversions, exact rebuilds of every recipe, the search, its gate, budget and chunks."""

from __future__ import annotations

import dataclasses
import json
import math
import multiprocessing
import operator

import pytest
import torch
from torch import nn

from benchmarks.tuning_models import PReLUCNN, RowRNN
from jobs.demo.models import ResidualCNN
from quantizer import GateNotMetError, int8, load_artifact, save_artifact
from quantizer import rnn, sensitivity, tuning
from quantizer.errors import ConfigError
from quantizer.fidelity import sqnr_db
from tests.quantizer.conftest import batches, train


@pytest.fixture(scope="module")
def prelu_cnn(digits) -> nn.Module:
    """PReLU slopes trained from 0.25 stay far below 1.0: torch's quantized PReLU then shrinks
    positive values too (its slope qparams cannot hold 1.0), so plain int8 is poor."""
    return train(PReLUCNN(width=32), digits["x_train"], digits["y_train"], epochs=2)


@pytest.fixture(scope="module")
def residual(digits) -> nn.Module:
    return train(ResidualCNN(width=16), digits["x_train"], digits["y_train"], epochs=2)


@pytest.fixture(scope="module")
def row_lstm(digits) -> nn.Module:
    return train(RowRNN("lstm", hidden=64), digits["x_train"], digits["y_train"], epochs=2)


@pytest.fixture(scope="module")
def calibrated(prelu_cnn, digits) -> torch.fx.GraphModule:
    return int8.calibrate_int8(prelu_cnn, batches(digits["x_train"], digits["y_train"], 32, 4), 4)


PRELUS = ["features.1", "features.3", "features.6", "dense.2"]


def _sqnr(model, converted, x) -> float:
    with torch.no_grad():
        return sqnr_db(model(x), converted(x))


# ----------------------------------------------------------------------------- RNN layers


@pytest.mark.parametrize("kind", [nn.LSTM, nn.GRU])
def test_layered_rnn_gives_the_same_bits_as_the_multi_layer_module(kind):
    torch.manual_seed(0)
    whole = kind(6, 12, 3, batch_first=True, bidirectional=True).eval()
    x, h0 = torch.randn(4, 7, 6), torch.randn(6, 4, 12)
    hx = (h0, torch.randn(6, 4, 12)) if kind is nn.LSTM else h0
    with torch.no_grad():
        want, got = whole(x, hx), rnn.split_rnn(whole)(x, hx)
    assert torch.equal(want[0], got[0])
    for a, b in zip(want[1] if kind is nn.LSTM else [want[1]], got[1] if kind is nn.LSTM else [got[1]]):
        assert torch.equal(a, b)


def test_weight_only_layer_with_float_weights_is_the_float_layer():
    torch.manual_seed(0)
    one = nn.LSTM(5, 9, 1, batch_first=True).eval()
    weights = {name: getattr(one, name).detach() for name in rnn.layer_weight_names(one, 0)}
    layer = rnn.WeightOnlyRNNLayer("LSTM", True, False, weights)
    x = torch.randn(3, 4, 5)
    with torch.no_grad():
        assert torch.equal(one(x)[0], layer(x)[0])


# ----------------------------------------------------------------------- static fallback


def test_fallback_units_are_graph_ops_with_their_parameters(calibrated, residual):
    units = int8.fallback_units(calibrated)
    assert list(units)[:4] == ["features.0", "features.1", "features.2", "features.3"]
    assert set(PRELUS) <= set(units) and units["features.1"] == 32 and units["features.0"] == 320
    assert "features.4" not in units        # max-pool shares its input's observer: no error
    prepared = int8.prepare_int8(residual, torch.zeros(2, 1, 8, 8))
    assert "blocks.0.relu" in int8.fallback_units(prepared)   # the residual add + ReLU


def test_float_layers_stay_float_and_lift_the_sqnr(prelu_cnn, calibrated, digits):
    x = digits["x_test"]
    plain = int8.convert_int8(calibrated)
    kept = int8.convert_int8(calibrated, PRELUS)
    # torch.fx lowers dequantize -> PReLU -> quantize to the int8 kernel even with a None
    # qconfig; the kept modules must still be float nn.PReLU, not QuantizedPReLU
    assert all(type(kept.get_submodule(name)).__name__ == "FloatPReLU" for name in PRELUS)
    assert all(isinstance(kept.get_submodule(name), nn.PReLU) for name in PRELUS)
    assert kept.int8_settings == {"recipe": "static", "backend": "fbgemm", "observer": "default",
                                  "activation_range": int8.activation_range("fbgemm"),
                                  "qconfig_version": int8.QCONFIG_VERSION,
                                  "float_layers": PRELUS, "forward_kwargs": {}}
    assert _sqnr(prelu_cnn, plain, x) < 12.0
    assert _sqnr(prelu_cnn, kept, x) > 25.0
    assert int8.quantized_fraction(kept, prelu_cnn) > 0.99


def test_a_function_unit_is_kept_float(residual, digits):
    prepared = int8.calibrate_int8(residual, batches(digits["x_train"], digits["y_train"], 32, 3), 3)
    converted = int8.convert_int8(prepared, ["blocks.0.relu"])
    assert isinstance(converted.get_submodule("blocks.0.relu"), nn.ReLU)
    # its add computes in float too (the convolutions before it give float outputs, version 2);
    # the other block's add and ReLU stay one int8 add_relu
    called = [n.target for n in converted.graph.nodes if n.op == "call_function"]
    assert operator.add in called and called.count(torch.ops.quantized.add_relu) == 1
    assert _sqnr(residual, converted, digits["x_test"]) > 20.0


def test_unknown_float_layer_lists_the_units(calibrated):
    with pytest.raises(ConfigError, match=r"'conv9' not in the model; its units are: features\.0"):
        int8.convert_int8(calibrated, ["conv9"])


def test_simulator_agrees_with_real_conversions(prelu_cnn, calibrated, digits):
    x = digits["x_test"][:128]
    with torch.no_grad():
        ref = prelu_cnn(x)
    simulator = int8.Int8Simulator(calibrated)
    gaps = []
    for unit in int8.fallback_units(calibrated):
        for kwargs in ({"quantized_only": [unit]}, {"float_layers": [unit]}):
            real = _sqnr(prelu_cnn, int8.convert_int8(calibrated, **kwargs), x)
            simulated = sqnr_db(ref, simulator.run(x, **kwargs))
            gaps.append(abs(real - simulated) if math.isfinite(real) else 0.0)
    assert max(gaps) < 0.5, gaps


# ------------------------------------------------------------------------- exact rebuilds


def _assert_reloads_bit_exact(converted, arch: str, x: torch.Tensor, tmp_path) -> None:
    """Saved as an artifact of ``benchmarks.tuning_models:build(arch)`` and loaded back, the model
    gives exactly ``converted``'s outputs on ``x``."""
    recipe = {"precision": "int8", "factory": "benchmarks.tuning_models:build",
              "kwargs": {"arch": arch}, "input_shape": [1, 8, 8],
              "int8": converted.int8_settings}
    save_artifact(converted, tmp_path, recipe, x[:2])
    loaded = load_artifact(tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(x), converted(x))


def test_static_rebuild_with_float_layers_is_bit_exact(prelu_cnn, calibrated, digits, tmp_path,
                                                       monkeypatch):
    import benchmarks.tuning_models as zoo
    monkeypatch.setitem(zoo.TUNING_ARCHS, "test-prelu", lambda: PReLUCNN(width=32))
    converted = int8.convert_int8(calibrated, PRELUS[1:])   # features.1 stays an int8 PReLU
    _assert_reloads_bit_exact(converted, "test-prelu", digits["x_test"], tmp_path)


@pytest.mark.parametrize("floats", [[], ["rnn.weight_ih_l0"], ["rnn.weight_hh_l1", "head"]])
def test_dynamic_rebuild_is_bit_exact(row_lstm, digits, tmp_path, monkeypatch, floats):
    import benchmarks.tuning_models as zoo
    monkeypatch.setitem(zoo.TUNING_ARCHS, "test-lstm", lambda: RowRNN("lstm", hidden=64))
    converted = int8.to_int8_dynamic(row_lstm, float_layers=floats)
    _assert_reloads_bit_exact(converted, "test-lstm", digits["x_test"], tmp_path)
    assert converted.int8_settings["recipe"] == "dynamic"


def test_dynamic_lstm_weights_count_as_int8_and_a_float_weight_splits_the_layer(row_lstm, digits):
    plain = int8.to_int8_dynamic(row_lstm)
    assert int8.quantized_fraction(plain, row_lstm) > 0.97   # packed LSTM weights are counted
    kept = int8.to_int8_dynamic(row_lstm, float_layers=["rnn.weight_ih_l0"])
    layers = kept.rnn.layers
    assert [type(m).__name__ for m in layers] == ["WeightOnlyRNNLayer", "_DynamicLSTM"]
    assert layers[0].weight_ih_l0.dtype == torch.float32 and layers[0].weight_hh_l0.is_quantized
    assert 0.9 < int8.quantized_fraction(kept, row_lstm) < 0.99
    assert _sqnr(row_lstm, kept, digits["x_test"]) > 20.0


@pytest.mark.parametrize("backend", int8.BACKENDS)
def test_dynamic_int8_runs_on_every_backend(row_lstm, digits, backend):
    converted = int8.to_int8_dynamic(row_lstm, backend, float_layers=["rnn.weight_ih_l0"])
    assert converted.int8_settings["backend"] == backend
    int8.set_engine(backend)
    assert _sqnr(row_lstm, converted, digits["x_test"]) > 20.0


def test_settings_a_rebuild_cannot_honour_are_refused(prelu_cnn, digits):
    example = digits["x_test"][:1]
    for recipe in ("static", "dynamic"):
        with pytest.raises(ConfigError, match="unknown fields granularity.*newer quantize-all"):
            int8.rebuild_int8(prelu_cnn, example, {"recipe": recipe, "granularity": 4})
    with pytest.raises(ConfigError, match="unknown int8 recipe 'sparse'"):
        int8.rebuild_int8(prelu_cnn, example, {"recipe": "sparse"})
    with pytest.raises(ConfigError, match="float layer 'conv9' not in the model"):
        int8.rebuild_int8(prelu_cnn, example, {"float_layers": ["conv9"]})


# ------------------------------------------------------------------------------ the search


def _tune(model, digits, gate, **config):
    loader = batches(digits["x_train"], digits["y_train"], 32, 4)
    return tuning.tune_int8(model, loader, digits["x_test"][:128], gate=gate,
                            targets=digits["y_test"][:128], calibration_batches=4,
                            config=tuning.TuningConfig(**config))


def test_tuning_keeps_the_fewest_prelus_float_that_meet_20_db(prelu_cnn, digits):
    result = _tune(prelu_cnn, digits, tuning.Gate(min_sqnr_db=20.0))
    chosen = result.chosen
    assert chosen.met and chosen.sqnr_db >= 20.0 and chosen.recipe == "static"
    assert chosen.float_layers and set(chosen.float_layers) <= set(PRELUS)
    assert result.trials[0].float_layers == () and result.trials[0].sqnr_db < 12.0
    smaller = [t for t in result.trials if len(t.float_layers) < len(chosen.float_layers)]
    assert smaller and not any(t.met for t in smaller)
    # pruning tried the chosen set without each of its layers
    tried = {frozenset(t.float_layers) for t in result.trials}
    assert all(frozenset(chosen.float_layers) - {name} in tried for name in chosen.float_layers)
    assert result.model.int8_settings["float_layers"] == list(chosen.float_layers)
    ranked = [item.name for item in sensitivity.ranked(result.sensitivity["static"])]
    assert ranked[0] in PRELUS
    fields = result.manifest_fields()
    json.dumps(fields, allow_nan=False)
    assert fields["tuning_trials"] == len(result.trials) >= 2 and fields["recipe"] == "static"


def test_no_gate_is_one_plain_conversion(prelu_cnn, digits):
    result = _tune(prelu_cnn, digits, tuning.Gate())
    assert len(result.trials) == 1 and result.chosen.float_layers == ()
    assert result.sensitivity == {} and result.reason == "static: no gate set: plain conversion"


def test_an_unreachable_gate_fails_naming_the_best_found(prelu_cnn, digits):
    with pytest.raises(GateNotMetError, match=r"no int8 model met min_sqnr_db 90 .* best static "
                                              r"reached SQNR \d+\.\d dB with float layers \[") as info:
        _tune(prelu_cnn, digits, tuning.Gate(min_sqnr_db=90.0))
    assert info.value.best["recipe"] == "static" and info.value.best["float_layers"]
    assert info.value.best["quantized_fraction"] >= 0.5


def test_the_budget_stops_the_search_after_the_plain_conversion(prelu_cnn, digits):
    with pytest.raises(GateNotMetError, match="budget ran out.*float layers \\[none\\]"):
        _tune(prelu_cnn, digits, tuning.Gate(min_sqnr_db=20.0), budget_s=1e-3)


def test_top1_drop_against_labels_and_against_fp32(prelu_cnn, digits):
    result = _tune(prelu_cnn, digits, tuning.Gate(max_top1_drop=0.02))
    assert result.chosen.top1_drop is not None and result.chosen.top1_drop <= 0.02
    ref = torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.0, 0.5], [0.2, 0.1]])
    out = torch.tensor([[2.0, 1.0], [0.0, 3.0], [0.1, 0.5], [0.0, 0.1]])
    gate = tuning.Gate(max_top1_drop=0.5)
    assert tuning.top1_drop(ref, out, gate, None) == 0.5                      # 2 of 4 disagree
    assert tuning.top1_drop(ref, out, gate, torch.tensor([0, 1, 0, 1])) == 0.0   # 3/4 right each
    with pytest.raises(ConfigError, match="class-score output.*fidelity.output"):
        tuning.top1_drop((ref, out), (ref, out), gate, None)


def test_auto_chooses_dynamic_for_an_lstm_and_says_why(row_lstm, digits):
    result = _tune(row_lstm, digits, tuning.Gate(min_sqnr_db=20.0), recipe="auto")
    assert result.chosen.recipe == "dynamic" and result.chosen.quantized_fraction > 0.9
    static = [t for t in result.trials if t.recipe == "static"]
    assert static and static[0].quantized_fraction < 0.1 and not static[0].met
    assert result.reason.startswith("auto chose dynamic") and "static:" in result.reason


# ------------------------------------------------------------------------------ the chunks


def test_chunks_in_two_processes_merge_to_the_one_process_result(prelu_cnn, calibrated, digits):
    task = sensitivity.task_for("static", prelu_cnn, digits["x_test"][:64], prepared=calibrated)
    whole = sensitivity.run_sensitivity(task)
    parts = sensitivity.split_tasks(task, 2)
    assert [len(p.units) for p in parts] == [5, 5]
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        chunks = pool.map(sensitivity.run_sensitivity, parts)
    merged = sensitivity.merge_sensitivity(chunks[::-1], task.units)
    assert [(m.name, m.sqnr_db) for m in merged] == [(w.name, w.sqnr_db) for w in whole]


def test_a_chunk_out_of_budget_reports_its_units_unmeasured_and_they_rank_last(prelu_cnn,
                                                                              calibrated, digits):
    task = sensitivity.task_for("static", prelu_cnn, digits["x_test"][:32], prepared=calibrated)
    late = sensitivity.run_sensitivity(dataclasses.replace(task, budget_s=0.0))
    assert [item.sqnr_db for item in late] == [None] * len(task.units)
    measured = sensitivity.LayerSensitivity("features.2", 30.0, 9248, 0.1)
    assert sensitivity.ranked(late[:2] + [measured])[0] is measured
    assert json.dumps([item.to_json() for item in late], allow_nan=False)


def test_merge_rejects_a_unit_of_another_model():
    item = sensitivity.LayerSensitivity("conv9", 30.0, 10, 0.1)
    with pytest.raises(ConfigError, match="unknown unit 'conv9'"):
        sensitivity.merge_sensitivity([[item]], ["conv1"])


def test_a_reference_the_caller_has_is_used_not_recomputed(residual, digits):
    x = digits["x_test"][:64]
    calib = batches(digits["x_train"], digits["y_train"], 32, 4)
    with torch.no_grad():
        outputs = residual(x)
    plain = tuning.tune_int8(residual, calib, x, calibration_batches=4)
    given = tuning.tune_int8(residual, calib, x, calibration_batches=4, reference=[outputs])
    assert plain.chosen.sqnr_db > 20
    assert given.chosen.sqnr_db == pytest.approx(plain.chosen.sqnr_db, abs=1e-6)
    # a reference that is not the model's outputs shows in the measured SQNR: it is what is used
    off = tuning.tune_int8(residual, calib, x, calibration_batches=4, reference=outputs * 2)
    assert off.chosen.sqnr_db < 7



def test_the_result_carries_the_chosen_models_outputs_on_the_held_out_rows(prelu_cnn, digits):
    """The orchestrator measures the int8 row from these instead of running the model again."""
    before = {k: v.clone() for k, v in prelu_cnn.state_dict().items()}
    result = _tune(prelu_cnn, digits, tuning.Gate(min_sqnr_db=20.0))
    assert result.chosen.float_layers, "the gate needs float layers: not the plain trial's model"
    after = prelu_cnn.state_dict()     # the caller's model (used as is: it is in eval mode)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    x = digits["x_test"][:128]
    with torch.no_grad():
        assert torch.equal(result.outputs, result.model(x))
        assert sqnr_db(prelu_cnn(x), result.outputs) == pytest.approx(result.chosen.sqnr_db,
                                                                       abs=1e-6)
