"""`python -m benchmarks COMMAND`: see `--help`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description="Benchmarks of lalm-export's graphs.")
    commands = parser.add_subparsers(dest="command", required=True)
    cost = commands.add_parser(
        "export-cost",
        help="time and peak RSS of exporting a base-sized encoder with verification",
        description="Export a base-sized encoder with random weights (default config) through the lalm-export CLI and report wall time and peak RSS.",
    )
    cost.add_argument("--family", choices=("wav2vec2", "hubert"), default="wav2vec2")
    cost.add_argument("--out", type=Path, help="also write the JSON figures to this file")
    args = parser.parse_args(argv)
    if args.command == "export-cost":
        from benchmarks.export_cost import run

        run(args.family, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
