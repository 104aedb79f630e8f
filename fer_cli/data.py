"""``fer data``: generate, adapt, validate, version and restore datasets."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("data", help="generate, validate, version and restore datasets",
                            description="Datasets: real formats in, gated and versioned prepared data out.")
    cmds = parser.add_subparsers(dest="data_command", metavar="DATA_COMMAND", required=True)
    formats = cmds.add_parser("formats", help="list the dataset formats the platform reads")
    formats.set_defaults(func=_formats)


def _formats(args: argparse.Namespace) -> int:
    from fer_core.data.formats import list_formats

    for fmt in list_formats():
        print(f"{fmt.name:14s} {fmt.task:8s} {fmt.description}")
    return 0
