"""The ``quantize-all`` command: a thin click layer over ``jobs.driver`` and ``jobs.verify``.

Each mode calls one library function and maps typed errors to SPEC.md's exit codes:
0 ok / up to date, 1 a model failed, 2 bad usage or zoo file, 3 DEST is locked (or this run lost its
lock), 4 Ray or the store unreachable. Human text goes to stderr when ``--json`` owns stdout. The
only module importing click; torch and Ray are imported only when there is work for them.
"""

from __future__ import annotations

import json
import sys

import click

from jobs.lock import LockLostError
from jobs.store import LockHeldError, StoreError
from jobs.zoo import BACKENDS, PRECISIONS, ZooError, load_zoo

EXAMPLES = """\b
Examples:
  quantize-all zoo.yaml --out ./artifacts
  quantize-all zoo.yaml -o ./artifacts --precision int8 --backend qnnpack --only 'resnet*'
  quantize-all zoo.yaml -o s3://bucket/zoo --address ray://head:10001 --json
  quantize-all zoo.yaml -o ./artifacts --dry-run      # what would be converted, and why
  quantize-all zoo.yaml -o ./artifacts --verify       # check every artifact (manifest and zoo)
  ray job submit --address http://HEAD:8265 --working-dir . -- \\
      quantize-all zoo.yaml --out s3://bucket/zoo

\b
Exit codes: 0 all ok or up to date, 1 a model failed (the rest were still converted),
2 bad usage or zoo file, 3 another run holds the lock on DEST, 4 Ray or the store unreachable.
"""


class ExitError(click.ClickException):
    """A ClickException with SPEC.md's exit code."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


@click.command(epilog=EXAMPLES, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("zoo", type=click.Path(dir_okay=False))
@click.option("--out", "-o", required=True, metavar="DEST",
              help="Output store: a folder or a URI (file://, s3://, gs://, hdfs://).")
@click.option("--precision", multiple=True, type=click.Choice(PRECISIONS),
              help="Repeatable; overrides the zoo's precisions.")
@click.option("--backend", type=click.Choice(BACKENDS), help="Overrides the zoo's int8 backend.")
@click.option("--calibration-batches", type=click.IntRange(min=1), metavar="N",
              help="Overrides the zoo's calibration batches.")
@click.option("--only", multiple=True, metavar="NAME",
              help="Repeatable shell-style glob over model names.")
@click.option("--address", metavar="ADDR",
              help="Ray cluster to join (default $RAY_ADDRESS, else a local Ray for this run).")
@click.option("--num-cpus", type=click.IntRange(min=1), metavar="N",
              help="CPUs of the local Ray (default: all).")
@click.option("--max-retries", type=click.IntRange(min=0), default=2, show_default=True,
              metavar="N", help="Retries of a task whose worker or node died.")
@click.option("--force", is_flag=True, help="Convert even what is up to date.")
@click.option("--dry-run", is_flag=True, help="Print the plan (convert / skip, and why); change nothing.")
@click.option("--verify", is_flag=True,
              help="Convert nothing; check every artifact in DEST against the manifest, and "
                   "its recipe against the zoo before loading it.")
@click.option("--json", "as_json", is_flag=True,
              help="Print the run summary as JSON on stdout (human text goes to stderr).")
@click.option("--allow-unsafe-pickle", is_flag=True,
              help="Permit zoo entries marked allow_pickle: true (full unpickling can run code).")
@click.version_option(package_name="quantize-all")
def main(zoo, out, precision, backend, calibration_batches, only, address, num_cpus,
         max_retries, force, dry_run, verify, as_json, allow_unsafe_pickle):
    """Convert a zoo of PyTorch checkpoints into FP16 and INT8 artifacts, fanned out over Ray.

    ZOO is the zoo file (YAML); DEST gets the artifacts, manifest.json, manifest.parquet,
    runs/RUN_ID.json and report.html. Unchanged models are skipped, so the same command
    is safe to run again and again (by hand, from cron, or with ray job submit).
    """
    human = sys.stderr if as_json else sys.stdout
    if verify:
        sys.exit(_verify(zoo, out, only, allow_unsafe_pickle, as_json, human))
    try:
        spec = load_zoo(zoo, precisions=precision or None, backend=backend,
                        calibration_batches=calibration_batches, only=only or None,
                        allow_unsafe_pickle=allow_unsafe_pickle)
    except ZooError as e:
        raise ExitError(str(e), 2) from None
    if dry_run:
        sys.exit(_dry_run(spec, out, force, as_json, human))
    sys.exit(_run(spec, out, address, num_cpus, max_retries, force, as_json, human))


def _run(spec, out, address, num_cpus, max_retries, force, as_json, human) -> int:
    from jobs import driver
    from jobs.manifest import ManifestError
    from jobs.summary import format_table, summary_json

    opts = driver.RunOptions(out=out, address=address, num_cpus=num_cpus,
                             max_retries=max_retries, force=force)
    try:
        result = driver.run(spec, opts)
    except KeyboardInterrupt:
        raise ExitError("interrupted: what finished is recorded in the manifest; run the same "
                        "command again to convert the rest", 130) from None
    except (LockHeldError, LockLostError) as e:
        raise ExitError(str(e), 3) from None
    except ManifestError as e:      # a non-finite number reached the writer: nothing written
        raise ExitError(str(e), 1) from None
    except (StoreError, driver.RayUnavailableError) as e:
        raise ExitError(str(e), 4) from None
    if as_json:
        click.echo(json.dumps(summary_json(result), indent=1, allow_nan=False))
    click.echo(format_table(result.rows), file=human)
    counts = result.counts
    click.echo(f"{counts['ok']} ok, {counts['failed']} failed, {counts['skipped']} skipped "
               f"in {result.duration_s:.1f} s (run {result.run_id}"
               f"{'' if result.ray_used else ', nothing to do: Ray not started'})", file=human)
    click.echo(f"manifest: {result.store}/manifest.json\nreport:   {result.store}/report.html",
               file=human)
    return result.exit_code


def _dry_run(spec, out, force, as_json, human) -> int:
    from jobs.driver import plan_only

    try:
        units = plan_only(spec, out, force=force)
    except StoreError as e:
        raise ExitError(str(e), 4) from None
    plan = [{"name": u.spec.name, "precision": u.precision, "action": u.action,
             "reason": u.reason, "key": u.key} for u in units]
    if as_json:
        click.echo(json.dumps({"dry_run": True, "plan": plan}, indent=1, allow_nan=False))
    for p in plan:
        click.echo(f"{p['action']:<8} {p['name']:<24} {p['precision']:<5} {p['reason']}", file=human)
    n = sum(p["action"] == "convert" for p in plan)
    click.echo(f"dry run: {n} to convert, {len(plan) - n} to skip; nothing changed", file=human)
    return 0


def _verify(zoo, out, only, allow_unsafe_pickle, as_json, human) -> int:
    from jobs.verify import verify_store

    try:   # the whole file, not the --only selection: it says which factory each model may use
        spec = load_zoo(zoo, allow_unsafe_pickle=allow_unsafe_pickle)
    except ZooError as e:
        raise ExitError(str(e), 2) from None
    try:
        results = verify_store(spec, out, tuple(only))
    except StoreError as e:
        raise ExitError(str(e), 4) from None
    bad = [r for r in results if not r["ok"]]
    if as_json:
        click.echo(json.dumps({"verify": results, "problems": len(bad)}, indent=1,
                              allow_nan=False))
    for r in results:
        status = "ok" if r["ok"] else f"FAILED: {r['problem']}"
        click.echo(f"{r['name']:<24} {r['precision']:<5} {status}", file=human)
    click.echo(f"verified {len(results)} artifact(s): {len(bad)} problem(s)", file=human)
    return 1 if bad else 0


if __name__ == "__main__":
    main()
