"""The pure logic of a run, in milliseconds: content keys, plan decisions, job order, CPU shares,
manifest merges, URIs and factory code located without importing it. No Ray, no conversions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from jobs import layout
from jobs.fanout import cpus_for
from jobs.keys import FactsCache, content_key, facts_part, inputs_digest, local_environment
from jobs.manifest import Manifest, merge_result
from jobs.plan import conversion_jobs, decide, estimate_s, make_plan
from jobs.sources import FactoryCode, Source, SourceHasher, locate_module, search_path
from jobs.store import Store, child_uri
from jobs.zoo import Calibration, ModelSpec, load_zoo

REPO = Path(__file__).resolve().parents[2]
FACTS = {"torch": "2.13.0+cpu", "quantizer": "0.1.0", "int8_qconfig": 2,
         "activation_range": {"fbgemm": "reduced", "qnnpack": "full", "x86": "reduced"}}
CODE = FactoryCode("/m.py", "c0de" * 16, "pkg==1.0")
SPEC = ModelSpec(name="m", factory="pkg.models:Net", checkpoint="/ckpt/m.pt",
                 calibration=Calibration(data="/calib/", batches=4, batch_size=8))


def _key(spec=SPEC, precision="int8", source="a" * 64, calib="b" * 64, code=CODE, facts=FACTS):
    inputs = inputs_digest(spec, precision, source, calib, code)
    return content_key(inputs, precision, spec.backend if precision == "int8" else None, facts)


# -- content keys -------------------------------------------------------------------------------
@pytest.mark.parametrize("change", [
    {"source": "c" * 64}, {"calib": "d" * 64},
    {"code": replace(CODE, sha256="e" * 64)}, {"code": replace(CODE, package="pkg==1.1")},
    {"spec": replace(SPEC, kwargs={"width": 2})}, {"spec": replace(SPEC, observer="minmax")},
    {"spec": replace(SPEC, calibration=replace(SPEC.calibration, batches=5))},
    {"facts": dict(FACTS, torch="2.14.0")}, {"facts": dict(FACTS, quantizer="0.2.0")},
    {"facts": dict(FACTS, activation_range=dict(FACTS["activation_range"], fbgemm="full"))},
    {"facts": dict(FACTS, int8_qconfig=3)},
])
def test_every_input_and_worker_fact_changes_the_int8_key(change):
    assert _key(**change) != _key()


def test_int8_only_settings_leave_the_fp16_key_alone():
    base = _key(precision="fp16")
    assert _key(precision="fp16", spec=replace(SPEC, backend="qnnpack", observer="minmax",
                                               min_sqnr_db=30.0, min_speedup=2.0)) == base
    assert _key(precision="int8", spec=replace(SPEC, min_sqnr_db=30.0)) != _key()
    assert _key(precision="fp16", spec=replace(SPEC, name="other", checkpoint="/x.pt")) == base
    ranges = dict(FACTS, activation_range={"fbgemm": "full"}, int8_qconfig=3)
    assert _key(precision="fp16", facts=ranges) == base
    assert facts_part("fp16", None, FACTS) == {"torch": "2.13.0+cpu", "quantizer": "0.1.0"}
    assert facts_part("int8", "qnnpack", FACTS)["activation_range"] == "full"


def test_a_zoo_key_added_later_is_in_every_key_without_touching_the_key_code():
    from dataclasses import dataclass, field

    @dataclass(frozen=True)
    class Later(ModelSpec):
        forward_kwargs: dict = field(default_factory=dict)

    later = Later(**{f: getattr(SPEC, f) for f in SPEC.__dataclass_fields__})
    for precision in ("fp16", "int8"):
        assert _key(spec=later, precision=precision) != _key(
            spec=replace(later, forward_kwargs={"embed": False}), precision=precision)


@pytest.mark.parametrize("source, calib", [(None, "b" * 64), ("a" * 64, None)])
def test_no_key_without_the_checkpoint_or_calibration_hash(source, calib):
    with pytest.raises(ValueError, match="no key without"):
        inputs_digest(SPEC, "int8", source, calib, CODE)


def test_the_facts_cache_round_trips_through_the_store(tmp_path):
    store = Store(str(tmp_path))
    cache = FactsCache(store)
    env = local_environment((str(REPO),))
    assert len(env) == 16 and cache.get(env) is None
    cache.put(env, FACTS)
    cache.save()
    assert FactsCache(store).get(env) == FACTS
    assert json.loads((tmp_path / layout.FACTS_CACHE).read_text()) == {env: FACTS}


# -- plan decisions -----------------------------------------------------------------------------
def _zoo(tmp_path, calib: bool = True) -> Path:
    (tmp_path / "m.pt").write_bytes(b"weights")
    (tmp_path / "calib").mkdir(exist_ok=True)
    (tmp_path / "calib" / "part-0.arrow").write_bytes(b"rows")
    data = "calibration: {data: calib/}" if calib else "calibration: {data: nowhere/}"
    (tmp_path / "zoo.yaml").write_text(
        f'models:\n  - {{name: m, factory: "tests.jobs.fault_models:TinyMLP", checkpoint: m.pt, '
        f'{data}}}\n')
    return tmp_path / "zoo.yaml"


def _plan(tmp_path, manifest=None, **kwargs):
    zoo = load_zoo(_zoo(tmp_path, kwargs.pop("calib", True)))
    store = Store(str(tmp_path / "out"))
    return make_plan(zoo, manifest or Manifest(), store, SourceHasher(store), FACTS,
                     search=search_path(str(tmp_path)), **kwargs)


def test_new_rows_convert_with_complete_keys(tmp_path):
    units = _plan(tmp_path)
    assert [(u.precision, u.action, u.reason) for u in units] == [
        ("fp16", "convert", "new"), ("int8", "convert", "new")]
    assert all(len(u.key) == 24 and u.source.sha256 for u in units)
    assert units[0].backend is None and units[1].backend == "fbgemm"


def test_a_new_dest_needs_no_worker_facts_the_workers_complete_the_keys(tmp_path):
    zoo = load_zoo(_zoo(tmp_path))
    store = Store(str(tmp_path / "out"))
    units = make_plan(zoo, Manifest(), store, SourceHasher(store), None)
    assert [(u.action, u.reason, u.key) for u in units] == [("convert", "new", None)] * 2
    assert all(len(u.inputs) == 64 for u in units)


def test_unreadable_checkpoint_fails_its_rows_without_a_key(tmp_path):
    _zoo(tmp_path)
    (tmp_path / "m.pt").unlink()
    zoo = load_zoo(tmp_path / "zoo.yaml")
    store = Store(str(tmp_path / "out"))
    units = make_plan(zoo, Manifest(), store, SourceHasher(store), FACTS, force=True)
    assert {(u.action, u.key, u.error[0]) for u in units} == {("fail", None, "CheckpointError")}
    assert "m.pt: not found" in units[0].error[1] and "sha256" in units[0].error[1]


def test_unreadable_calibration_data_fails_its_rows_without_a_key(tmp_path):
    units = _plan(tmp_path, calib=False)
    assert {(u.action, u.key, u.error[0]) for u in units} == {("fail", None, "CalibrationError")}
    assert "nowhere" in units[0].error[1]


def _ok_row(unit, **changes) -> dict:
    return {"name": "m", "precision": unit.precision, "status": "ok", "key": unit.key,
            "run_id": "r1", "source_sha256": unit.source.sha256, "backend": unit.backend,
            "torch_version": FACTS["torch"], "quantizer_version": FACTS["quantizer"],
            "files": [{"path": "model.pt", "sha256": "x", "bytes": 3}], **changes}


def test_skip_needs_every_recorded_file_with_its_size(tmp_path):
    fp16 = _plan(tmp_path)[0]
    store, row = Store(str(tmp_path / "out")), _ok_row(fp16)
    args = (SPEC, "fp16", fp16.key, fp16.source, FACTS, row, store, False)
    assert decide(*args) == ("convert", "artifact missing or incomplete in the store")
    store.write_bytes(f"{layout.artifact_dir('m', 'fp16', fp16.key)}/model.pt", b"abc")
    assert decide(*args) == ("skip", "up to date (run r1)")
    store.write_bytes(f"{layout.artifact_dir('m', 'fp16', fp16.key)}/model.pt", b"abcd")
    assert decide(*args)[0] == "convert"
    assert decide(*args[:-1], True) == ("convert", "--force")


@pytest.mark.parametrize("changes, reason", [
    ({"status": "failed", "error_type": "TraceError"}, "last attempt failed (TraceError)"),
    ({"key": "other", "source_sha256": "old"}, "checkpoint changed"),
    ({"key": "other", "backend": "qnnpack"}, "backend changed (qnnpack -> fbgemm)"),
    ({"key": "other", "torch_version": "2.12.0"}, "versions changed (torch 2.12.0 -> 2.13.0+cpu"),
    ({"key": "other"}, "settings, calibration data or factory code changed"),
])
def test_why_a_row_is_converted_again(tmp_path, changes, reason):
    int8 = _plan(tmp_path)[1]
    row = _ok_row(int8, **changes)
    action, why = decide(SPEC, "int8", int8.key, int8.source, FACTS, row,
                         Store(str(tmp_path / "out")), False)
    assert action == "convert" and why.startswith(reason)


def test_jobs_group_a_models_rows_and_run_longest_first():
    def unit(name, precision, mb):
        spec = replace(SPEC, name=name)
        from jobs.plan import Unit
        return Unit(spec, precision, "convert", "new", "i" * 64, "k" * 24,
                    Source(f"/{name}.pt", "s" * 64, int(mb * 2**20)))
    units = [unit("small", "fp16", 1), unit("small", "int8", 1), unit("big", "int8", 40),
             unit("timed", "fp16", 1), unit("timed", "int8", 1)]
    manifest = Manifest([{"name": "timed", "precision": p, "duration_s": d}
                         for p, d in (("fp16", 30.0), ("int8", 20.0))])
    jobs = conversion_jobs(units, manifest, "/out", "run-1")
    assert [j.name for j in jobs] == ["timed", "big", "small"]
    assert [p.precision for p in jobs[2].precisions] == ["fp16", "int8"]
    assert jobs[0].estimate_s == 50.0             # the last run's durations, when all are known
    assert jobs[1].estimate_s == pytest.approx(estimate_s(jobs[1].spec, ["int8"],
                                                          jobs[1].source, Manifest()))
    assert jobs[2].backend_for("fp16") is None and jobs[2].backend_for("int8") == "fbgemm"



def test_jobs_never_timed_are_ordered_by_size_and_layers(tmp_path):
    """A checkpoint's tensors count as well as its megabytes: a deep model of small layers is
    expected to take longer than a shallow one of the same size (the fan-out runs it first)."""
    import torch
    from safetensors.torch import save_file

    from jobs.sources import tensor_count

    deep = {f"layer{i}.weight": torch.zeros(64, 64) for i in range(64)}         # 64 x 16 KB
    shallow = {"layer0.weight": torch.zeros(64 * 64 * 64)}                     # one of 1 MB
    for name, state in (("deep", deep), ("shallow", shallow)):
        torch.save(state, tmp_path / f"{name}.pt")
    save_file(deep, str(tmp_path / "deep.safetensors"), metadata={"format": "pt"})
    torch.save(shallow, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    store = Store(str(tmp_path / "out"))
    sources = {name: SourceHasher(store).digest(str(tmp_path / name)) for name in
               ("deep.pt", "shallow.pt", "deep.safetensors", "legacy.pt")}
    assert sources["deep.safetensors"].tensors == 64
    assert sources["deep.pt"].tensors - sources["shallow.pt"].tensors == 63  # + the zip's records
    assert sources["legacy.pt"].tensors is None
    assert tensor_count(b"", b"") is None and tensor_count(b"\x00" * 8, b"") is None
    assert abs(sources["deep.pt"].bytes - sources["shallow.pt"].bytes) < 0.1 * 2**20

    def unit(name):
        from jobs.plan import Unit
        return Unit(replace(SPEC, name=name.replace(".", "-")), "int8", "convert", "new",
                    "i" * 64, "k" * 24, sources[name])
    order = [j.name for j in conversion_jobs([unit("shallow.pt"), unit("deep.pt")], Manifest(),
                                             "/out", "r")]
    assert order == ["deep-pt", "shallow-pt"]
    # the hasher's cache keeps the count: a second hasher reads it without rereading the file
    hasher = SourceHasher(store)
    hasher.digest(str(tmp_path / "deep.pt"))
    hasher.save()
    assert SourceHasher(store).digest(str(tmp_path / "deep.pt")).tensors == \
        sources["deep.pt"].tensors

def jobs_label(units) -> str:
    return conversion_jobs(units, Manifest(), "/out", "r")[0].label


def test_with_cpus_to_spare_each_precision_is_its_own_job():
    from jobs.plan import Unit, jobs_for

    units = [Unit(replace(SPEC, name=n), p, "convert", "new", "i" * 64, None,
                  Source(f"/{n}.pt", "s" * 64, 2**20))
             for n in ("a", "b") for p in ("fp16", "int8")]
    assert len(conversion_jobs(units, Manifest(), "/out", "r")) == 2
    split = conversion_jobs(units, Manifest(), "/out", "r", per_precision=True)
    assert sorted((j.name, [p.precision for p in j.precisions]) for j in split) == [
        ("a", ["fp16"]), ("a", ["int8"]), ("b", ["fp16"]), ("b", ["int8"])]
    assert split[0].precisions[0].precision == "int8"        # the longer half first
    assert [j.label for j in split[:2]] == ["a.int8", "b.int8"] and jobs_label(units) == "a"
    assert [len(jobs_for(units, Manifest(), "/out", "r", cpus)) for cpus in (1, 2, 3, 4, 32)] == [
        2, 2, 4, 4, 4]      # estimates fp16 0.51 s, int8 1.02 s: on 3 CPUs ~1.2 s split, 1.5 whole


def test_precisions_are_split_only_when_that_ends_the_run_sooner():
    from jobs.plan import lpt_makespan, split_by_precision

    assert lpt_makespan([2, 3, 2, 3, 2], 2) == 7 and lpt_makespan([5, 1], 8) == 5
    assert split_by_precision([4, 4], [3, 1, 3, 1], 32)                   # 3.57 s against 4
    assert split_by_precision([8, 2, 2, 2], [6, 2] + [1.5, 0.5] * 3, 4)   # one long model: 7.14 / 8
    assert not split_by_precision([4] * 16, [3, 1] * 16, 16)   # equal models: 4.76 s against 4
    assert not split_by_precision([4] * 16, [3, 1] * 16, 2)
    assert not split_by_precision([4, 4], [3.9, 0.1] * 2, 32)  # the repeated load eats it: 4.64
    assert not split_by_precision([4, 4], [3.3, 0.7] * 2, 32)  # 3.93: under the 5 % it must gain


@pytest.mark.parametrize("free, waiting, cap, expected", [
    (2, 16, 8, 1), (2, 2, 8, 1), (2, 1, 8, 2), (16, 4, 8, 4), (16, 1, 8, 8), (16, 16, 8, 1),
    (5, 2, 8, 2), (1, 0, 8, 1)])
def test_jobs_get_more_cpus_only_when_fewer_wait_than_cpus_are_free(free, waiting, cap, expected):
    assert cpus_for(free, waiting, cap) == expected


# -- manifest merge -----------------------------------------------------------------------------
def test_a_failed_attempt_keeps_the_last_good_artifact_and_its_own_key():
    good = {"name": "m", "precision": "int8", "status": "ok", "key": "k1", "run_id": "r1",
            "artifact_uri": "file:///a/model.pt", "artifact_sha256": "s", "sqnr_db": 30.0}
    failed = {"name": "m", "precision": "int8", "status": "failed", "key": "k2", "run_id": "r2",
              "error_type": "FidelityError", "error_message": "below"}
    row = merge_result(good, failed)
    assert (row["status"], row["key"], row["run_id"]) == ("failed", "k2", "r1")
    assert (row["artifact_uri"], row["sqnr_db"]) == ("file:///a/model.pt", 30.0)
    assert row["error_type"] == "FidelityError" and "from run r1" in row["notes"]
    assert merge_result(None, failed)["artifact_uri"] is None


# -- sources ------------------------------------------------------------------------------------
@pytest.mark.parametrize("uri, child", [
    ("s3://b/calib/?endpoint_override=h:9000&scheme=http",
     "s3://b/calib/x.arrow?endpoint_override=h:9000&scheme=http"),
    ("s3://key:secret@b/calib", "s3://key:secret@b/calib/x.arrow"),
    ("/data/calib/", "/data/calib/x.arrow")])
def test_child_uris_keep_the_query_last(uri, child):
    assert child_uri(uri, "x.arrow") == child


def test_factory_code_is_found_and_hashed_without_importing_it(tmp_path):
    pkg = tmp_path / "zoopkg" / "nets"
    pkg.mkdir(parents=True)
    (tmp_path / "zoopkg" / "__init__.py").write_text("raise RuntimeError('imported!')\n")
    (pkg / "cnn.py").write_text("raise RuntimeError('imported!')\n")
    path = search_path(str(tmp_path))
    assert locate_module("zoopkg.nets.cnn", path) == str(pkg / "cnn.py")   # a namespace level
    assert locate_module("zoopkg", path) == str(tmp_path / "zoopkg" / "__init__.py")
    assert locate_module("zoopkg.nets.missing", path) is None
    assert "zoopkg" not in sys.modules


def test_an_installed_factory_is_found_with_its_package_version_and_torch_stays_unimported():
    code = ("import sys; from jobs.sources import factory_code, search_path; "
            "c = factory_code('torch.nn.modules.linear:Linear', search_path('.')); "
            "print(c.file); print(c.package); print(len(c.sha256)); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=str(REPO)), check=True).stdout.split()
    assert out[0].endswith(os.path.join("torch", "nn", "modules", "linear.py"))
    assert out[1].startswith("torch==") and out[2] == "64" and out[3] == "False"


def test_planning_and_the_driver_import_neither_torch_nor_ray():
    code = ("import sys, jobs.driver, jobs.plan, jobs.keys, jobs.sources, jobs.publish, "
            "jobs.layout; print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'ray'}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=str(REPO)), check=True).stdout
    assert out.strip() == "[]"
