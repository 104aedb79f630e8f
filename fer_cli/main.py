"""``fer`` entry point. Each command group lives in its own module with ``add_parser(subparsers)``.

Heavy imports (mlflow, prefect, great_expectations, dvc) happen inside the command functions so
that ``fer --help`` stays fast.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import signal
import sys
import threading
import traceback
from pathlib import Path
from typing import Sequence

from fer_core.errors import (
    EXIT_BUG,
    EXIT_CODES,
    EXIT_DATA,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_SERVICE,
    EXIT_STATE,
    EXIT_USAGE,
    FERError,
)
from fer_platform.workspace import PRIVATE_UMASK

# Command-group modules, in help order.
_COMMAND_MODULES = ("fer_cli.data", "fer_cli.train", "fer_cli.evaluate", "fer_cli.au", "fer_cli.serve",
                    "fer_cli.app", "fer_cli.models", "fer_cli.pipeline", "fer_cli.demo")

EXIT_ERROR = EXIT_FAILED  # the command ran and failed (e.g. a data gate refused the data)
__all__ = ["CommandError", "EXIT_OK", "EXIT_ERROR", "EXIT_USAGE", "EXIT_DATA", "EXIT_STATE", "EXIT_SERVICE",
           "EXIT_BUG", "main"]
# Packages of the platform: a bare ValueError raised *by their own code* is still treated as a
# user-input error (exit 2) while the remaining raise sites are converted to fer_core.errors;
# a ValueError raised inside numpy/pandas/torch/... is a bug and gets its traceback.
_PLATFORM_ROOT = Path(__file__).resolve().parent.parent
_PLATFORM_PACKAGES = ("fer_core", "fer_cli", "registry", "serving", "flows", "data_checks")
_ENVIRONMENT_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT}


class CommandError(FERError):
    """A failure to report as one line with an exit code, never as a traceback."""

    def __init__(self, message: str, exit_code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _raised_by_platform(exc: BaseException) -> bool:
    """Whether the innermost frame of ``exc``'s traceback is in one of the platform's packages."""
    tb = exc.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    path = Path(tb.tb_frame.f_code.co_filename).resolve()
    try:
        rel = path.relative_to(_PLATFORM_ROOT)
    except ValueError:
        return False
    return rel.parts[0] in _PLATFORM_PACKAGES


def _exit_code_epilog() -> str:
    rows = "\n".join(f"  {code:>3}  {meaning}" for code, meaning in EXIT_CODES)
    return f"exit codes:\n{rows}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fer",
        description="FER platform: generate and version data, train, track, promote and serve "
        "facial-expression models. Local state lives in $FER_HOME (default ./.fer).",
        epilog=_exit_code_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter,
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
    # Everything the platform writes (datasets, checkpoints, the MLflow DB, server logs) is its
    # owner's only; child processes (DVC, MLflow, Triton) inherit the mask.
    os.umask(PRIVATE_UMASK)
    try:  # building the parser reads the network registry (help texts), which can refuse a bad plugin list
        parser = build_parser()
    except FERError as exc:
        print(f"fer: error: {_one_line(exc)}", file=sys.stderr)
        return exc.exit_code
    args = parser.parse_args(argv)
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if in_main_thread else None
    try:
        return int(args.func(args) or EXIT_OK)
    except FERError as exc:  # what the user can act on: one line, the kind's exit code
        print(f"fer: error: {_one_line(exc)}", file=sys.stderr)
        return exc.exit_code
    except ValueError as exc:
        if not _raised_by_platform(exc):
            return _bug(exc)
        print(f"fer: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:
        if exc.errno not in _ENVIRONMENT_ERRNOS:
            raise
        # A workspace the user cannot write, a full disk: the environment's fault, said in one line.
        where = f" {exc.filename}" if exc.filename else ""
        print(f"fer: error: cannot write{where}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("fer: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - anything else is a bug: show where
        return _bug(exc)
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)


def _one_line(exc: BaseException) -> str:
    return " | ".join(line.strip() for line in str(exc).strip().splitlines() if line.strip()) or type(exc).__name__


def _bug(exc: BaseException) -> int:
    traceback.print_exception(exc, file=sys.stderr)
    print(f"fer: internal error ({type(exc).__name__}); this is a bug, please report it with the traceback above",
          file=sys.stderr)
    return EXIT_BUG


if __name__ == "__main__":
    sys.exit(main())
