"""The CLI's surface: --help, the README's option table, usage errors (exit 2, nothing written)."""

from __future__ import annotations

import re
from pathlib import Path

from click.testing import CliRunner

from jobs.cli import main

README = Path(__file__).resolve().parents[2] / "README.md"
SPEC_OPTIONS = {
    "--out", "--precision", "--backend", "--calibration-batches", "--only", "--address",
    "--num-cpus", "--max-retries", "--force", "--dry-run", "--verify", "--json",
    "--allow-unsafe-pickle",
}


def help_options() -> set[str]:
    text = CliRunner().invoke(main, ["--help"]).output
    return set(re.findall(r"^\s+(?:-\w, )?(--[a-z-]+)", text, re.M)) - {"--help", "--version"}


def readme_options() -> set[str]:
    table = README.read_text().split("<!-- options:")[1].split("\n\n")[0]
    return set(re.findall(r"^\| `(--[a-z-]+)", table, re.M))


def test_readme_option_table_matches_help():
    assert readme_options() == help_options() == SPEC_OPTIONS


def test_help_ends_with_examples_and_exit_codes():
    text = CliRunner().invoke(main, ["--help"]).output
    tail = text[text.index("Examples:"):]
    assert "quantize-all zoo.yaml --out" in tail and "ray job submit" in tail
    assert "3 another run holds the lock" in tail


def test_zoo_with_three_mistakes_reports_all_and_writes_nothing(tmp_path):
    zoo = tmp_path / "zoo.yaml"
    zoo.write_text(
        "models:\n"
        "  - {name: a, factory: 'm:f', checkpoint: a.pt, precisions: [int4]}\n"
        "  - {name: a, factory: 'm:f', checkpoint: b.pt}\n"
        "  - {name: c, checkpoint: c.pt, colour: blue}\n")
    out = tmp_path / "out"
    result = CliRunner().invoke(main, [str(zoo), "--out", str(out)])
    assert result.exit_code == 2
    err = result.stderr
    assert "int4" in err and "precisions" in err
    assert "duplicate" in err.lower() and "'a'" in err
    assert "colour" in err and "factory" in err
    assert err.count(str(zoo)) >= 3 or err.count("zoo.yaml") >= 3
    assert not out.exists()


def test_bad_option_value_is_exit_2(tmp_path):
    zoo = tmp_path / "zoo.yaml"
    zoo.write_text("models: []\n")
    result = CliRunner().invoke(main, [str(zoo), "--out", str(tmp_path / "o"), "--backend", "tpu"])
    assert result.exit_code == 2 and "tpu" in result.output + result.stderr
    assert not (tmp_path / "o").exists()


def test_missing_zoo_file_is_exit_2(tmp_path):
    result = CliRunner().invoke(main, [str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "nope.yaml" in result.stderr
