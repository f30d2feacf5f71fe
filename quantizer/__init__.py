"""quantize-all's conversion library: fp32 PyTorch models in, fp16 and int8 models out.

No Ray, no click, no ``jobs`` here: this package runs inside one Ray task, a notebook or a plain
script alike (``tests/quantizer/test_imports.py`` proves it).
"""

from __future__ import annotations

__version__ = "0.2.0"

from quantizer.errors import (  # noqa: F401  (re-exported)
    ArtifactError,
    CalibrationError,
    CheckpointError,
    CheckpointKeysError,
    ConfigError,
    ConversionError,
    FactoryError,
    FidelityError,
    GateNotMetError,
    InputShapeError,
    NotQuantizedError,
    QuantizerError,
    SpeedupError,
    TraceError,
    UnsafePickleError,
)
from quantizer.fp16 import to_fp16
from quantizer.int8 import BACKENDS, OBSERVERS, quantized_fraction, to_int8, to_int8_dynamic
from quantizer.calibration import CalibrationData, read_calibration, write_calibration
from quantizer.checkpoints import import_factory, load_model
from quantizer.artifacts import load_artifact, save_artifact
from quantizer.fidelity import (measure_latency_ms, sqnr_db, sqnr_db_per_output, top1_agreement,
                                top1_output)
from quantizer.tuning import Gate, TuningConfig, TuningResult, tune_int8

__all__ = [
    # conversions: one verb per precision
    "to_fp16",
    "to_int8",
    "to_int8_dynamic",
    "BACKENDS",
    "OBSERVERS",
    "quantized_fraction",
    # calibration data held in Arrow
    "CalibrationData",
    "read_calibration",
    "write_calibration",
    # checkpoints in, artifacts out (never trusting a pickle by default)
    "import_factory",
    "load_model",
    "save_artifact",
    "load_artifact",
    # fidelity of a converted model against its fp32 source
    "sqnr_db",
    "sqnr_db_per_output",
    "top1_output",
    "top1_agreement",
    "measure_latency_ms",
    # accuracy-gated int8: the fewest layers in float that meet a gate
    "tune_int8",
    "Gate",
    "TuningConfig",
    "TuningResult",
    # errors
    "QuantizerError",
    "ConfigError",
    "ConversionError",
    "CalibrationError",
    "TraceError",
    "InputShapeError",
    "FactoryError",
    "CheckpointError",
    "CheckpointKeysError",
    "UnsafePickleError",
    "ArtifactError",
    "NotQuantizedError",
    "FidelityError",
    "GateNotMetError",
    "SpeedupError",
]
