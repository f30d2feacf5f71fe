"""Content keys: everything that determines a result, hashed, in a driver part and a worker part.

``KEY = sha256(inputs ‖ facts)[:24]``.

- *inputs* (the driver's part, ``inputs_digest``): the checkpoint's sha256, every setting of the
  model's zoo entry that shapes a result (factory, kwargs, calibration settings, gates, and for
  int8 only the backend, observer, batch count, int8 gates and tuning settings; a zoo key added
  later is in every key unless listed otherwise, and those in ``SILENT_AT_DEFAULT`` only when set
  to something other than their default), the sha256 of the factory module's source file and
  the installed version of its top-level package (``jobs.sources.factory_code``), precision, and
  the calibration data's sha256.
- *facts* (the worker's part, ``facts_part``): the torch and quantizer versions of the process
  that converts, and for int8 the activation range its quantizer chooses for the backend
  (``quantizer.int8.activation_range``) and its qconfig version (``QCONFIG_VERSION``: which ops
  are quantized, and how). A task computes these itself and completes the key, so a
  row is keyed on what its worker ran, even on a ``ray://`` cluster whose workers differ from the
  driver.

The driver needs the facts to decide skips before any task runs. ``FactsCache`` keeps the facts
the workers reported, per environment: on this machine (a local Ray, whose workers run the
driver's interpreter and packages) the environment is a fingerprint of the interpreter, the torch
and quantize-all distributions, the ``quantizer`` package's source files and the CPU, read without
importing torch, so a no-op refresh needs neither torch nor Ray, and an edit of the quantizer
(which may change what it chooses) makes the facts be asked again. A joined cluster is asked
(one small task) at the start of every run. Must not import ray,
click or torch.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import MISSING, Field, asdict, fields, is_dataclass
import platform
import sys
from importlib import metadata

from jobs.layout import FACTS_CACHE
from jobs.sources import FactoryCode, package_sha256
from jobs.store import Store
from jobs.zoo import ModelSpec

KEY_CHARS = 24


# ModelSpec fields that never change a result: the row's name, where the checkpoint is (its
# sha256 is in the key), which precisions are asked for, the pickle opt-in.
NOT_IN_KEY = ("name", "checkpoint", "precisions", "allow_pickle")
# Fields that shape int8 results only: an fp16 row's key leaves them out, so changing the backend
# reconverts the int8 rows alone. Every other field, a key added to the zoo later included, is
# in every key: a new setting reconverts rather than leaves a stale artifact.
INT8_ONLY = ("backend", "observer", "min_sqnr_db", "min_speedup", "min_quantized_fraction",
             "recipe", "max_top1_drop", "tuning")
INT8_ONLY_CALIBRATION = ("batches",)
# Fields added after stores with keys existed: at their default value (the behaviour before they
# existed) they are left out, so an upgrade does not reconvert a zoo that does not use them. Set
# to anything else, they are in the key like every other field.
SILENT_AT_DEFAULT = ("checkpoint_key", "ignore_keys", "strip_prefix", "forward_kwargs", "fidelity",
                     "recipe", "max_top1_drop", "tuning")


def inputs_digest(spec: ModelSpec, precision: str, source_sha256: str,
                  calibration_sha256: str | None, code: FactoryCode) -> str:
    """The driver's part of a key: every result-shaping field of ``spec`` (see ``NOT_IN_KEY``,
    ``INT8_ONLY``), the hashes of the checkpoint, the calibration data and the factory's code.
    Both data hashes must be known: a key never lacks them."""
    if not source_sha256 or (spec.calibration.data and not calibration_sha256):
        raise ValueError(f"model {spec.name}: no key without the checkpoint's and the "
                         f"calibration data's sha256")
    skip = NOT_IN_KEY + (() if precision == "int8" else INT8_ONLY)
    settings = {f.name: _plain(getattr(spec, f.name)) for f in fields(spec) if f.name not in skip
                and not (f.name in SILENT_AT_DEFAULT and _at_default(spec, f))}
    settings["calibration"] = {
        k: v for k, v in asdict(spec.calibration).items() if k != "data"
        and (precision == "int8" or k not in INT8_ONLY_CALIBRATION)}
    return _sha({"settings": settings, "precision": precision, "source": source_sha256,
                 "calibration": calibration_sha256, **code.key_part()})


def _plain(value):
    """A setting as JSON sees it: a nested dataclass (``fidelity``, ``tuning``) as its dict."""
    return asdict(value) if is_dataclass(value) else value


def _at_default(spec: ModelSpec, f: Field) -> bool:
    default = f.default_factory() if f.default_factory is not MISSING else f.default
    return _plain(getattr(spec, f.name)) == _plain(default)


def facts_part(precision: str, backend: str | None, facts: dict) -> dict:
    """The worker facts a (precision, backend) result depends on."""
    part = {"torch": facts["torch"], "quantizer": facts["quantizer"]}
    if precision == "int8":
        part["activation_range"] = (facts.get("activation_range") or {}).get(backend)
        part["int8_qconfig"] = facts.get("int8_qconfig")   # which ops int8 quantizes, and how
    return part


def content_key(inputs: str, precision: str, backend: str | None, facts: dict) -> str:
    """The full key: the driver's inputs digest completed with the worker's facts."""
    return _sha({"inputs": inputs, "facts": facts_part(precision, backend, facts)})[:KEY_CHARS]


def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def local_environment(search: tuple[str, ...] = ()) -> str:
    """A fingerprint of what a local worker runs: interpreter, torch, quantize-all and the
    source of the ``quantizer`` package it imports (found on ``search``), and the CPU."""
    parts = [sys.executable, sys.version, platform.machine(), _cpu(),
             package_sha256("quantizer", search)]
    for dist in ("torch", "quantize-all"):
        try:
            parts.append(f"{dist}=={metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            parts.append(f"{dist}: not installed")
    return _sha(parts)[:16]


def _cpu() -> str:
    """The CPU model and its feature flags (an int8 activation range may depend on them)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            lines = [line for line in f if line.startswith(("model name", "flags", "Features"))]
    except OSError:
        return platform.processor()
    return "".join(sorted(set(lines)))


class FactsCache:
    """The workers' facts as they last reported them, per environment, in DEST."""

    def __init__(self, store: Store):
        self.store = store
        self.entries: dict[str, dict] = store.read_json(FACTS_CACHE) or {}
        self.dirty = False

    def get(self, environment: str) -> dict | None:
        return self.entries.get(environment)

    def put(self, environment: str, facts: dict) -> None:
        if self.entries.get(environment) != facts:
            self.entries[environment] = facts
            self.dirty = True

    def save(self) -> None:
        if self.dirty:
            self.store.write_json(FACTS_CACHE, self.entries)
            self.dirty = False
