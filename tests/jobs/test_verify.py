"""``--verify`` trusts the zoo file, not DEST: whoever can write the bucket can rewrite an
artifact's recipe and the manifest's hashes, so an artifact whose recipe names code other than
the zoo's is refused before anything it names is imported. No Ray: DEST is built with the library.
"""

from __future__ import annotations

import io
import json

import pytest
import torch
from click.testing import CliRunner

import quantizer
from jobs.cli import main
from jobs.demo.models import DigitsMLP
from jobs.manifest import Manifest, blank_row
from jobs.store import Store
from quantizer.checkpoints import file_digest

FACTORY, KWARGS = "jobs.demo.models:DigitsMLP", {"hidden": 16}
ZOO = f"""models:
  - {{name: mlp, factory: "{FACTORY}", kwargs: {json.dumps(KWARGS)}, checkpoint: mlp.pt,
      precisions: [fp16]}}
"""


def publish(dest, name: str) -> dict:
    """Convert a tiny MLP to fp16 into DEST as a run would; return its manifest row."""
    torch.manual_seed(0)
    folder = dest / "artifacts" / name / "fp16" / "k1"
    recipe = {"name": name, "precision": "fp16", "factory": FACTORY, "kwargs": KWARGS,
              "backend": None, "observer": None, "input_shape": [64], "input_dtype": "float16"}
    files = quantizer.save_artifact(quantizer.to_fp16(DigitsMLP(**KWARGS)), folder, recipe,
                                    torch.rand(1, 64).half())
    return blank_row(name=name, precision="fp16", status="ok", key="k1", files=files,
                     artifact_uri=(folder / "model.pt").as_uri())


def tamper(dest, row: dict, *, recipe_json: bool = True, **recipe) -> dict:
    """What someone who can write DEST does: rewrite the recipes (``model.pt``'s, and
    ``recipe.json`` unless told not to) and the manifest's hashes."""
    folder = dest / "artifacts" / row["name"] / "fp16" / "k1"
    payload = torch.load(folder / "model.pt", weights_only=True)
    payload["recipe"].update(recipe)
    buf = io.BytesIO()
    torch.save(payload, buf)
    (folder / "model.pt").write_bytes(buf.getvalue())
    if recipe_json:
        (folder / "recipe.json").write_text(json.dumps(payload["recipe"]))
    files = [dict(f, **dict(zip(("sha256", "bytes"), file_digest(folder / f["path"]))))
             for f in row["files"]]
    return dict(row, files=files)


def verify(tmp_path, dest, rows: list[dict]) -> tuple[int, dict]:
    Manifest(rows).write(Store(str(dest)))
    zoo = tmp_path / "zoo.yaml"
    zoo.write_text(ZOO)
    result = CliRunner().invoke(main, [str(zoo), "--out", str(dest), "--verify", "--json"])
    return result.exit_code, json.loads(result.stdout)


def test_an_untouched_artifact_verifies(tmp_path):
    dest = tmp_path / "dest"
    code, report = verify(tmp_path, dest, [publish(dest, "mlp")])
    assert code == 0 and report["verify"] == [
        {"name": "mlp", "precision": "fp16", "ok": True, "problem": None}]


@pytest.mark.parametrize("case", ["other-factory", "other-kwargs", "model-pt-only"])
def test_a_recipe_naming_other_code_is_refused_before_any_import(tmp_path, case):
    dest, marker = tmp_path / "dest", tmp_path / "PWNED"
    recipe, words = {
        # check_call(args=["touch", marker]) writes the marker if anything ever calls it
        "other-factory": ({"factory": "subprocess:check_call",
                           "kwargs": {"args": ["touch", str(marker)]}},
                          "names factory 'subprocess:check_call' with kwargs {\"args\""),
        # the zoo's factory with other kwargs builds another model than the zoo says
        "other-kwargs": ({"kwargs": {"hidden": 16, "layers": 3}}, '"layers": 3'),
        # recipe.json left as it was: load_artifact rebuilds from the recipe inside model.pt
        "model-pt-only": ({"recipe_json": False, "factory": "subprocess:check_call",
                           "kwargs": {"args": ["touch", str(marker)]}},
                          "model.pt: refused without importing anything"),
    }[case]
    code, report = verify(tmp_path, dest, [tamper(dest, publish(dest, "mlp"), **recipe)])
    assert code == 1 and report["problems"] == 1
    problem = report["verify"][0]["problem"]
    assert "refused without importing anything" in problem and words in problem, problem
    assert f"names '{FACTORY}' with kwargs" in problem and "zoo.yaml" in problem
    assert not marker.exists()


def test_a_model_not_in_the_zoo_is_reported_and_not_loaded(tmp_path):
    dest, marker = tmp_path / "dest", tmp_path / "PWNED"
    ghost = tamper(dest, publish(dest, "ghost"), factory="subprocess:check_call",
                   kwargs={"args": ["touch", str(marker)]})
    code, report = verify(tmp_path, dest, [publish(dest, "mlp"), ghost])
    assert code == 1 and report["problems"] == 1
    bad = {r["name"]: r["problem"] for r in report["verify"] if not r["ok"]}
    assert "model 'ghost' is not in the zoo file" in bad["ghost"] and "not loaded" in bad["ghost"]
    assert not marker.exists()


def test_a_manifest_file_path_outside_the_folder_is_refused(tmp_path):
    dest = tmp_path / "dest"
    row = publish(dest, "mlp")
    row["files"].append({"path": "../../../../zoo.yaml", "sha256": "0" * 64, "bytes": 1})
    code, report = verify(tmp_path, dest, [row])
    assert code == 1 and "not a file inside this folder" in report["verify"][0]["problem"]


def test_verify_with_a_bad_zoo_exits_2(tmp_path):
    zoo = tmp_path / "zoo.yaml"
    zoo.write_text("models:\n  - {name: .tmp-x, factory: 'm:f', checkpoint: a.pt}\n")
    result = CliRunner().invoke(main, [str(zoo), "--out", str(tmp_path / "dest"), "--verify"])
    assert result.exit_code == 2 and "key 'name'" in result.output
