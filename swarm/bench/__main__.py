"""`python -m swarm.bench [OPTIONS]`: the same as `swarm bench [OPTIONS]`."""

from __future__ import annotations

import argparse
import sys

from ..errors import SwarmError
from . import add_bench_arguments, main_bench


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="swarm bench")
    add_bench_arguments(parser)
    try:
        return main_bench(parser.parse_args(argv))
    except SwarmError as e:
        print(f"swarm bench: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
