"""End to end on real data: a CNN trained on sklearn's digits keeps its accuracy through fp16/int8."""

from __future__ import annotations

import torch

from quantizer.fp16 import to_fp16
from quantizer.int8 import set_engine, to_int8
from tests.quantizer.conftest import SmallCNN, accuracy, batches, train


def test_digits_cnn_accuracy_survives_conversion(digits):
    torch.manual_seed(7)
    model = train(SmallCNN(width=16), digits["x_train"], digits["y_train"], epochs=12, seed=7)
    x, y = digits["x_test"], digits["y_test"]
    fp32_acc = accuracy(model, x, y)
    assert fp32_acc >= 0.95

    loader = batches(digits["x_train"], digits["y_train"], 32, 12)
    converted = to_int8(model, loader, calibration_batches=10)
    assert converted.calibration_batches_used == 10
    set_engine("fbgemm")
    int8_acc = accuracy(converted, x, y)
    fp16_acc = accuracy(to_fp16(model), x.half(), y)

    # 400 held-out images: one point is four images
    assert fp32_acc - int8_acc <= 0.010, (fp32_acc, int8_acc)
    assert fp32_acc - fp16_acc <= 0.005, (fp32_acc, fp16_acc)
