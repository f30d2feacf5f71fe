"""A zoo file for ``quantize-all`` over real models: the six pretrained networks whose weights ship
in pip wheels (``tests.real.models``) and the small digit classifiers of
``benchmarks.tuning_models`` (depthwise, SE, SiLU, Hardswish, PReLU, attention, LSTM, GRU blocks),
with their calibration shards written by ``quantizer.write_calibration``.

``write_zoo(folder)`` writes ``folder/zoo.yaml``, ``folder/calib/*`` and the digit models'
checkpoints (trained briefly here), and returns the zoo's path; the pretrained checkpoints are
the wheels' own files, named by absolute path. Every int8 row is gated at ``MIN_SQNR_DB`` (what
issue 13 asks for). Shared by tests/real/test_cli_real.py and ``benchmarks.sensitivity_ray``.
Must import only torch, numpy, scikit-learn, quantizer and the repository's model modules.
"""

from __future__ import annotations

import json
import os

import torch

import quantizer
from tests.real import models as real

MIN_SQNR_DB = 20.0
HELD_OUT = 64                   # jobs.plan.FIDELITY_ROWS: the rows after the calibration rows
# name -> (factory, kwargs, calibration rows as (batches, batch_size), extra zoo keys)
PRETRAINED = {
    "crepe-full": ("Crepe", {"model": "full"}, (2, 16), {"forward_kwargs": {"embed": False}}),
    "crepe-tiny": ("Crepe", {"model": "tiny"}, (2, 16), {"forward_kwargs": {"embed": False}}),
    "mtcnn-pnet": ("PNet", {}, (4, 16), {}),                    # 4-D outputs: no class scores
    "mtcnn-rnet": ("RNet", {}, (4, 16), {"fidelity": {"output": 1}}),   # (boxes, face prob)
    "mtcnn-onet": ("ONet", {}, (4, 16), {"fidelity": {"output": 2}}),   # (+ landmarks)
    "speaker-encoder": ("VoiceEncoder", {}, (2, 16), {
        "checkpoint_key": "model_state", "ignore_keys": ["similarity_*"], "recipe": "auto"}),
}
# benchmarks.tuning_models architectures: int8 only, recipe auto (static, then dynamic)
ARCHS = ("residual-cnn", "depthwise-cnn", "digits-mlp", "mbconv-silu-se", "hardswish-se",
         "prelu-cnn", "tiny-vit", "lstm-2layer", "gru-2layer")
ARCH_CALIBRATION = (4, 32)
ARCH_EPOCHS = 2
TOP1_GATED = {"prelu-cnn": 0.05}      # max_top1_drop on held-out labels, beside min_sqnr_db


def pretrained_inputs(name: str, rows: int, seed: int) -> torch.Tensor:
    """``rows`` inputs of a pretrained model: CREPE frames, MTCNN crops, speaker mels."""
    if name.startswith("crepe"):
        return real.crepe_frames(rows, seed=seed)[0]
    if name.startswith("mtcnn"):
        return real.mtcnn_crops(rows, {"p": 12, "r": 24, "o": 48}[name[6]], seed=seed)
    return real.voice_mels(rows, seed=seed)


def _yaml(value) -> str:
    return json.dumps(value)           # JSON is YAML: one-line flow values


def _entry(name: str, factory: str, kwargs: dict, checkpoint: str, calib: str,
           batches_size: tuple[int, int], extra: dict, precisions: str) -> str:
    batches, size = batches_size
    lines = [f"  - name: {name}", f"    factory: {factory}", f"    kwargs: {_yaml(kwargs)}",
             f"    checkpoint: {_yaml(checkpoint)}", f"    precisions: {precisions}",
             f"    calibration: {{data: {calib}, batches: {batches}, batch_size: {size}}}"]
    lines += [f"    {key}: {_yaml(value)}" for key, value in extra.items()]
    return "\n".join(lines)


def _pretrained(folder: str, names) -> list[str]:
    entries = []
    for name in names:
        cls, kwargs, (batches, size), extra = PRETRAINED[name]
        quantizer.write_calibration(os.path.join(folder, "calib", name),
                                    pretrained_inputs(name, batches * size + HELD_OUT, seed=1))
        entries.append(_entry(name, f"tests.real.models:{cls}", kwargs, real.asset(name),
                              f"calib/{name}/", (batches, size), extra, "[fp16, int8]"))
    return entries


def _archs(folder: str, names) -> list[str]:
    from benchmarks import tuning_models
    from jobs.demo.build import digits_split

    split = digits_split(0)
    rows = ARCH_CALIBRATION[0] * ARCH_CALIBRATION[1] + HELD_OUT
    quantizer.write_calibration(os.path.join(folder, "calib", "digits"),
                                split.held_x[:rows], split.held_y[:rows])
    os.makedirs(os.path.join(folder, "ckpt"), exist_ok=True)
    entries = []
    for name in names:
        model, _ = tuning_models.trained(name, epochs=ARCH_EPOCHS)
        torch.save(model.state_dict(), os.path.join(folder, "ckpt", f"{name}.pt"))
        extra = {"recipe": "auto"}
        if name in TOP1_GATED:
            extra["max_top1_drop"] = TOP1_GATED[name]
        entries.append(_entry(name, "benchmarks.tuning_models:build", {"arch": name},
                              f"ckpt/{name}.pt", "calib/digits/", ARCH_CALIBRATION, extra,
                              "[int8]"))
    return entries


def write_zoo(folder, *, pretrained=tuple(PRETRAINED), archs=ARCHS, budget_s: float = 60.0) -> str:
    """Write the zoo (``pretrained`` and ``archs`` select its models) into ``folder``."""
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    entries = _pretrained(folder, pretrained) + _archs(folder, archs)
    path = os.path.join(folder, "zoo.yaml")
    with open(path, "w", encoding="utf-8") as f:
        f.write(f"defaults:\n  min_sqnr_db: {MIN_SQNR_DB:g}\n  tuning: {{budget_s: {budget_s:g}}}\n"
                "models:\n" + "\n".join(entries) + "\n")
    return path
