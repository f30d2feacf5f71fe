"""jobs.zoo: the zoo file is checked whole, every problem reported at once, then resolved."""

from __future__ import annotations

import os
import textwrap

import pytest
import yaml

from jobs.manifest import Manifest, blank_row
from jobs.zoo import (
    BACKENDS,
    OBSERVERS,
    Calibration,
    ModelSpec,
    ZooError,
    load_zoo,
)

GOOD = """
defaults:
  precisions: [fp16, int8]
  backend: fbgemm
  calibration: {data: calib/, batches: 10, batch_size: 8}
  min_sqnr_db: 20
  min_speedup: null
  observer: default
models:
  - name: resnet18
    factory: torchvision.models:resnet18
    kwargs: {num_classes: 10}
    checkpoint: ckpt/resnet18.pt
    calibration: {data: s3://bucket/calib/imagenet-mini/, batches: 20}
  - name: tiny-mlp
    factory: mypkg.models:TinyMLP
    checkpoint: ckpt/tiny.pt
    precisions: [int8]
    calibration: {data: calib/flat.parquet, shape: [64]}
  - name: tiny-cnn
    factory: mypkg.models:TinyCNN
    checkpoint: file:///srv/ckpt/cnn.pt
    backend: qnnpack
    observer: minmax
    min_sqnr_db: 15.5
    min_quantized_fraction: 0.9
"""


def write(tmp_path, text: str, name: str = "zoo.yaml") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def problems(tmp_path, text: str, **overrides) -> list[str]:
    path = write(tmp_path, text)
    with pytest.raises(ZooError) as info:
        load_zoo(path, **overrides)
    assert info.value.path == path
    assert str(info.value).startswith(f"{path}: {len(info.value.problems)} problem(s)")
    return info.value.problems


def one_problem(tmp_path, text: str, **overrides) -> str:
    found = problems(tmp_path, text, **overrides)
    assert len(found) == 1, found
    return found[0]


def model(**keys) -> str:
    """A zoo with one model: a valid fp16 entry with ``keys`` changed (None drops a key)."""
    entry = {"name": "m", "factory": "pkg.mod:make", "checkpoint": "m.pt", "precisions": "[fp16]"}
    entry.update(keys)
    lines = [f"    {k}: {v}" for k, v in entry.items() if v is not None]
    return "models:\n  - " + "\n".join(lines).lstrip()


# ---- a good file ----------------------------------------------------------------------------------

def test_good_file_merges_defaults_and_resolves_paths(tmp_path):
    path = write(tmp_path, GOOD)
    zoo = load_zoo(path)
    assert zoo.path == path
    resnet, mlp, cnn = zoo.models
    assert resnet == ModelSpec(
        name="resnet18", factory="torchvision.models:resnet18",
        checkpoint=str(tmp_path / "ckpt" / "resnet18.pt"), kwargs={"num_classes": 10},
        precisions=("fp16", "int8"), backend="fbgemm",
        # calibration merges key by key: data and batches from the model, batch_size from defaults
        calibration=Calibration(data="s3://bucket/calib/imagenet-mini/", batches=20, batch_size=8),
        min_sqnr_db=20.0, min_speedup=None, observer="default")
    assert type(resnet.kwargs) is dict
    assert mlp.precisions == ("int8",)
    assert mlp.calibration == Calibration(data=str(tmp_path / "calib" / "flat.parquet"),
                                          batches=10, batch_size=8, shape=(64,))
    assert mlp.kwargs == {}
    assert cnn.checkpoint == "file:///srv/ckpt/cnn.pt"          # URIs stay as written
    assert cnn.calibration.data == str(tmp_path / "calib")      # inherited, resolved
    assert (cnn.backend, cnn.observer, cnn.min_sqnr_db) == ("qnnpack", "minmax", 15.5)
    assert cnn.min_quantized_fraction == 0.9
    assert resnet.min_quantized_fraction == 0.5                 # the dataclass default


def test_relative_paths_are_relative_to_the_zoo_folder_not_the_cwd(tmp_path, monkeypatch):
    sub = tmp_path / "zoos"
    sub.mkdir()
    write(sub, GOOD)
    monkeypatch.chdir(tmp_path)
    zoo = load_zoo(os.path.join("zoos", "zoo.yaml"))
    assert zoo.models[0].checkpoint == str(sub / "ckpt" / "resnet18.pt")
    assert os.path.isabs(zoo.models[1].calibration.data)


def test_overrides_replace_the_file_values(tmp_path):
    zoo = load_zoo(write(tmp_path, GOOD), precisions=["int8"], backend="x86",
                   calibration_batches=3)
    assert [m.precisions for m in zoo.models] == [("int8",)] * 3
    assert [m.backend for m in zoo.models] == ["x86"] * 3
    assert [m.calibration.batches for m in zoo.models] == [3, 3, 3]
    assert zoo.models[0].calibration.batch_size == 8            # untouched by the override


@pytest.mark.parametrize("only, expected", [
    (["tiny-*"], ["tiny-mlp", "tiny-cnn"]),
    (["resnet18", "*cnn"], ["resnet18", "tiny-cnn"]),
    (["??????18"], ["resnet18"]),
    (["*"], ["resnet18", "tiny-mlp", "tiny-cnn"]),
])
def test_only_globs_select_models_in_file_order(tmp_path, only, expected):
    zoo = load_zoo(write(tmp_path, GOOD), only=only)
    assert [m.name for m in zoo.models] == expected
    assert zoo.all_names == ("resnet18", "tiny-mlp", "tiny-cnn")   # the file's, not the selection


def test_retirement_follows_the_file_not_the_only_selection(tmp_path):
    """``--only tiny-mlp`` must not retire resnet18 and tiny-cnn (they are still in the file)."""
    rows = [blank_row(name=n, precision="fp16", status="ok")
            for n in ("resnet18", "tiny-mlp", "tiny-cnn", "dropped")]
    manifest = Manifest(rows)
    zoo = load_zoo(write(tmp_path, GOOD), only=["tiny-mlp"])
    assert manifest.mark_retired(set(zoo.all_names)) == [("dropped", "fp16")]
    assert [r["name"] for r in manifest.sorted_rows() if r["retired"]] == ["dropped"]


def test_only_matching_nothing_is_a_problem(tmp_path):
    msg = one_problem(tmp_path, GOOD, only=["tiny-*", "bert*"])
    assert "--only" in msg and "'bert*' matches no model" in msg
    assert "resnet18, tiny-mlp, tiny-cnn" in msg


def test_allow_pickle_needs_the_command_line_opt_in(tmp_path):
    text = model(allow_pickle="true")
    msg = one_problem(tmp_path, text)
    assert "models[0] (name 'm'): key 'allow_pickle'" in msg and "--allow-unsafe-pickle" in msg
    (spec,) = load_zoo(write(tmp_path, text), allow_unsafe_pickle=True).models
    assert spec.allow_pickle is True


def test_repeated_precisions_are_kept_once(tmp_path):
    (spec,) = load_zoo(write(tmp_path, model(precisions="[fp16, fp16]"))).models
    assert spec.precisions == ("fp16",)


def test_backends_and_observers_match_the_library():
    int8 = pytest.importorskip("quantizer.int8")
    assert tuple(int8.BACKENDS) == BACKENDS
    assert tuple(int8.OBSERVERS) == OBSERVERS


# ---- every problem, named ----------------------------------------------------------------------

def test_the_example_message_format(tmp_path):
    text = GOOD.replace("precisions: [int8]", "precisions: [int4]")
    msg = one_problem(tmp_path, text)
    assert msg == (f"{tmp_path / 'zoo.yaml'}: models[1] (name 'tiny-mlp'): key 'precisions': "
                   "'int4' is not a precision; allowed: fp16, int8")


def test_three_mistakes_are_reported_together(tmp_path):
    text = """
    defaults:
      backend: arm
      calibration: {data: calib/}
    models:
      - name: a
        factory: pkg.mod:make
        checkpoint: a.pt
        precision: [fp16]
      - name: b
        factory: pkg.mod:make
        precisions: [fp16]
    """
    found = problems(tmp_path, text)
    assert len(found) == 3, found
    assert "defaults: key 'backend': 'arm' is not a backend; allowed: fbgemm, qnnpack, x86" \
        in found[0]
    assert "models[0] (name 'a'): key 'precision': unknown key; did you mean 'precisions'?" \
        in found[1]
    assert "models[1] (name 'b'): key 'checkpoint': missing" in found[2]


def test_not_yaml_names_the_line(tmp_path):
    msg = one_problem(tmp_path, "models:\n  - name: a\n   bad: [unclosed\n")
    assert "not valid YAML at line 3, column 4: expected <block end>" in msg


def test_a_missing_file_is_a_zoo_error(tmp_path):
    with pytest.raises(ZooError, match="cannot read the zoo file"):
        load_zoo(tmp_path / "nope.yaml")


@pytest.mark.parametrize("text, expected", [
    ("- a\n- b\n", "the top level is ['a', 'b'], not a mapping"),
    ("", "the top level is null, not a mapping"),
    ("defaults: {}\n", "key 'models': missing; expected a list of models"),
    ("models: []\n", "key 'models': [] is not a non-empty list"),
    ("models: {a: 1}\n", "key 'models': {'a': 1} is not a non-empty list"),
    ("models:\n  - 5\n", "models[0]: 5 is not a mapping"),
    ("defaults: [1]\n" + model(), "key 'defaults': [1] is not a mapping"),
    (model() + "\nmodel: []\n", "key 'model': unknown key; did you mean 'models'?"),
])
def test_file_shape_problems(tmp_path, text, expected):
    assert expected in one_problem(tmp_path, text)


@pytest.mark.parametrize("keys, key, expected", [
    ({"name": None}, "name", "missing; every model needs name, factory and checkpoint"),
    ({"factory": None}, "factory", "missing"),
    ({"checkpoint": None}, "checkpoint", "missing"),
    ({"chekpoint": "x.pt"}, "chekpoint", "unknown key; did you mean 'checkpoint'?"),
    ({"name": "'a/b'"}, "name", "'a/b' is not a valid name; allowed: letters"),
    ({"name": "'..'"}, "name", "'..' is not a valid name"),
    ({"name": "'.'"}, "name", "'.' is not a valid name"),
    # the store owns dot-names: a model '.tmp-x' would be swept as a temporary by every run
    ({"name": "'.tmp-x'"}, "name", "'.tmp-x' is not a valid name; allowed: letters, digits, "
                                   "'.', '_', '-', not starting with '.'"),
    ({"name": "'.hidden'"}, "name", "'.hidden' is not a valid name"),
    ({"name": "'a b'"}, "name", "'a b' is not a valid name"),
    ({"name": "[a]"}, "name", "['a'] is not a valid name"),
    ({"name": "7"}, "name", "7 is not a valid name"),
    ({"factory": "pkg.mod"}, "factory", "'pkg.mod' is not of the form 'module:callable'"),
    ({"factory": "'pkg mod:f'"}, "factory", "is not of the form 'module:callable'"),
    ({"checkpoint": "''"}, "checkpoint", "'' is not a path or URI"),
    ({"precisions": "[fp32]"}, "precisions", "'fp32' is not a precision; allowed: fp16, int8"),
    ({"precisions": "fp16"}, "precisions", "'fp16' is not a non-empty list of precisions"),
    ({"precisions": "[]"}, "precisions", "[] is not a non-empty list"),
    ({"backend": "arm"}, "backend", "'arm' is not a backend; allowed: fbgemm, qnnpack, x86"),
    ({"observer": "histogram"}, "observer", "'histogram' is not an observer; allowed: "
                                            "default, minmax"),
    ({"min_sqnr_db": "high"}, "min_sqnr_db", "'high' is not a number or null"),
    ({"min_speedup": "true"}, "min_speedup", "true is not a number or null"),
    ({"min_speedup": ".nan"}, "min_speedup", "nan is not a number or null"),
    ({"min_quantized_fraction": "1.5"}, "min_quantized_fraction", "1.5 is not a number in [0, 1]"),
    ({"min_quantized_fraction": "-0.1"}, "min_quantized_fraction", "is not a number in [0, 1]"),
    ({"allow_pickle": "yes please"}, "allow_pickle", "'yes please' is not true or false"),
    ({"kwargs": "[1, 2]"}, "kwargs", "[1, 2] is not a mapping of keyword arguments"),
    ({"kwargs": "{1: a}"}, "kwargs", "keys 1 are not strings"),
    ({"kwargs": "{when: 2024-01-01}"}, "kwargs", "is not JSON-serialisable"),
    ({"calibration": "calib/"}, "calibration", "'calib/' is not a mapping; allowed keys: data, "
                                               "batches, batch_size, shape"),
    ({"calibration": "{data: c, batchs: 3}"}, "calibration.batchs",
     "unknown key; did you mean 'batches'?"),
    ({"calibration": "{data: c, batches: 0}"}, "calibration.batches", "0 is not a positive "
                                                                       "integer"),
    ({"calibration": "{data: c, batches: 2.5}"}, "calibration.batches", "2.5 is not a positive"),
    ({"calibration": "{data: c, batch_size: -1}"}, "calibration.batch_size", "-1 is not a "
                                                                             "positive integer"),
    ({"calibration": "{data: c, shape: [8, 0]}"}, "calibration.shape", "[8, 0] is not a list of "
                                                                       "positive integers"),
    ({"calibration": "{data: c, shape: 64}"}, "calibration.shape", "64 is not a list"),
    ({"calibration": "{data: 3}"}, "calibration.data", "3 is not a path or URI"),
    ({"precisions": "[int8]"}, "calibration.data", "missing; int8 needs calibration data"),
])
def test_model_key_problems(tmp_path, keys, key, expected):
    msg = one_problem(tmp_path, model(**keys))
    name = yaml.safe_load(keys.get("name", "m") or "null")
    where = f"models[0] (name '{name}')" if isinstance(name, str) else "models[0]"
    assert msg.startswith(f"{tmp_path / 'zoo.yaml'}: {where}: "), msg
    assert f"key '{key}': " in msg and expected in msg, msg


@pytest.mark.parametrize("defaults, expected", [
    ("name: x", "defaults: key 'name': unknown key"),
    ("factory: a:b", "defaults: key 'factory': unknown key"),
    ("backend: arm", "defaults: key 'backend': 'arm' is not a backend"),
    ("calibration: {rows: 3}", "defaults: key 'calibration.rows': unknown key"),
    ("allow_pickle: true", "defaults: key 'allow_pickle': true, but"),
])
def test_defaults_problems(tmp_path, defaults, expected):
    assert expected in one_problem(tmp_path, f"defaults:\n  {defaults}\n" + model())


def test_duplicate_names(tmp_path):
    text = model() + "\n  - name: m\n    factory: a:b\n    checkpoint: x.pt\n" \
                     "    precisions: [fp16]\n"
    msg = one_problem(tmp_path, text)
    assert "models[1] (name 'm'): key 'name': 'm' is a duplicate of models[0]" in msg


def test_int8_from_an_override_needs_calibration_data(tmp_path):
    msg = one_problem(tmp_path, model(), precisions=["int8"])
    assert "key 'calibration.data': missing; int8 needs calibration data" in msg


def test_int8_data_may_come_from_defaults(tmp_path):
    text = "defaults:\n  calibration: {data: s3://b/c/}\n" + model(precisions="[int8]")
    (spec,) = load_zoo(write(tmp_path, text)).models
    assert spec.calibration.data == "s3://b/c/"


@pytest.mark.parametrize("overrides, expected", [
    ({"precisions": ["int4"]}, "--precision: 'int4' is not a precision; allowed: fp16, int8"),
    ({"backend": "arm"}, "--backend: 'arm' is not a backend"),
    ({"calibration_batches": 0}, "--calibration-batches: 0 is not a positive integer"),
])
def test_bad_overrides(tmp_path, overrides, expected):
    assert expected in one_problem(tmp_path, model(), **overrides)
