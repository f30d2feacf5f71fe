"""Typed errors of the conversion library.

Every error the library raises on bad input is a ``QuantizerError``; the orchestrator turns them
into ``failed`` manifest rows (``error_type`` is the class name) and the CLI into exit codes.
Messages name the culprit (file, module, column, key), what was received, and what to do.
Must not import torch, ray or click.
"""

from __future__ import annotations


class QuantizerError(Exception):
    """Base class of every error this library raises on purpose."""


class ConfigError(QuantizerError, ValueError):
    """A bad argument: unknown backend or observer, ``calibration_batches < 1``, ..."""


class CalibrationError(QuantizerError):
    """Calibration data is missing, empty, has the wrong schema, or holds NaN/Inf."""


class TraceError(QuantizerError):
    """torch.fx cannot trace the model (data-dependent control flow, ...)."""


class InputShapeError(QuantizerError):
    """The model rejects the calibration inputs (expected vs got shape)."""


class FactoryError(QuantizerError):
    """A ``module:callable`` factory cannot be imported or called."""


class CheckpointError(QuantizerError):
    """A checkpoint is missing, empty, truncated or not a torch file."""


class CheckpointKeysError(CheckpointError):
    """A state_dict does not fit the model: missing/unexpected keys or wrong shapes."""


class UnsafePickleError(CheckpointError):
    """A checkpoint needs full unpickling (it could run code) and that was not allowed."""


class ConversionError(QuantizerError):
    """A conversion cannot give a faithful model, e.g. a weight beyond fp16's range that no
    rewrite can bring into it (the message names the tensor)."""


class ArtifactError(QuantizerError):
    """An artifact file cannot be read back or is not one this tool wrote."""


class NotQuantizedError(QuantizerError):
    """An int8 conversion left (almost) every parameter in float."""


class FidelityError(QuantizerError):
    """The converted model is below the requested SQNR floor."""


class SpeedupError(QuantizerError):
    """The converted model is slower than the requested ``min_speedup``."""


class GateNotMetError(FidelityError):
    """No int8 model the tuner tried met the fidelity gate; the message names the best found.

    ``best`` holds that best trial as a dict (recipe, float_layers, sqnr_db, top1_drop, ...).
    """

    def __init__(self, message: str, best: dict | None = None):
        super().__init__(message)
        self.best = best or {}
