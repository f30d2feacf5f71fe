"""``python -m jobs.demo build DEST``: train the demo models and write a zoo folder at DEST.

Owns the demo's command line only (argparse: this is a helper, not part of the product's click CLI).
Must not import ray or click.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the chosen command.

    Args:
        argv: arguments without the program name; None reads ``sys.argv``.

    Returns:
        The process exit code (0 on success).
    """
    parser = argparse.ArgumentParser(
        prog="python -m jobs.demo",
        description="Bundled demo zoo on scikit-learn's digits.",
        epilog="example: python -m jobs.demo build /tmp/demo && quantize-all /tmp/demo/zoo.yaml -o /tmp/out",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="train the demo models and write DEST/zoo.yaml")
    build.add_argument("dest", metavar="DEST", help="folder to write (created; overwritten)")
    build.add_argument("--epochs", type=int, default=8, help="training epochs per model (default 8)")
    build.add_argument("--seed", type=int, default=0, help="seed of the split and training (default 0)")
    build.add_argument("--quiet", action="store_true", help="print only the zoo path")
    args = parser.parse_args(argv)

    from jobs.demo.build import build_demo  # torch and scikit-learn load only when building

    zoo = build_demo(args.dest, epochs=args.epochs, seed=args.seed, verbose=not args.quiet)
    print(zoo)
    return 0


if __name__ == "__main__":
    sys.exit(main())
