"""``python -m batchd.daemon.emulator``: the same as ``batchd emulator``."""

from __future__ import annotations

import argparse
import sys

from batchd.daemon.emulator.cli import add_arguments, run


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m batchd.daemon.emulator", description="Serve a local Message Batches API."
    )
    add_arguments(parser)
    return run(parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
