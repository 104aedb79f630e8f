"""``fer`` entry point. Each command group lives in its own module with ``add_parser(subparsers)``.

Heavy imports (mlflow, prefect, great_expectations, dvc) happen inside the command functions so
that ``fer --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
import threading
from typing import Sequence

# Command-group modules, in help order.
_COMMAND_MODULES = ("fer_cli.data", "fer_cli.train", "fer_cli.au", "fer_cli.serve", "fer_cli.registry",
                    "fer_cli.pipeline", "fer_cli.demo", "fer_cli.app")

EXIT_OK = 0
EXIT_ERROR = 1  # the command ran and failed (e.g. a data gate refused the data)
EXIT_USAGE = 2  # bad arguments or bad input


class CommandError(Exception):
    """A failure to report as one line with an exit code, never as a traceback."""

    def __init__(self, message: str, exit_code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fer",
        description="FER platform: generate and version data, train, track, promote and serve "
        "facial-expression models. Local state lives in $FER_HOME (default ./.fer).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in _COMMAND_MODULES:
        importlib.import_module(module).add_parser(sub)
    return parser


def _terminate(signum: int, frame: object) -> None:
    # A SIGTERM (e.g. `kill`, a scheduler stopping a job) unwinds like Ctrl-C, so open MLflow runs are
    # closed as KILLED and servers started by the command are stopped.
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if in_main_thread else None
    try:
        return int(args.func(args) or EXIT_OK)
    except CommandError as exc:
        print(f"fer: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except ValueError as exc:  # bad user input from the library layer
        print(f"fer: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("fer: interrupted", file=sys.stderr)
        return 130
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
