"""The ``prodsim`` command line: argument parsing, early checks, a session, a summary.

Everything that can be checked without Spark (arguments, config, the catalog's path and header) is
checked first, so a mistake costs a second rather than a JVM start.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from prodsim_spark.config import CATALOG_FORMATS, ProdsimConfig, load_config
from prodsim_spark.errors import ProdsimError

log = logging.getLogger("prodsim_spark.cli")

_EXIT_USAGE = 2


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--conf", action="append", default=[], metavar="FILE",
                        help="YAML config file layered over the defaults (conf/default.yaml); repeatable")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="override one config key, e.g. --set ingest.columns.title=name; repeatable")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prodsim",
        description="Catalog-scale product similarity on Spark: validates a product catalog, embeds "
                    "text and images, and writes each product's K most similar products to Delta tables.",
        epilog="Run 'prodsim COMMAND --help' for a command's options. Config reference: conf/default.yaml.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser(
        "run", help="run the whole job on a catalog",
        description="Run every stage on a catalog and write Delta tables under --output: "
                    "catalog (validated rows, each with status and reason).")
    run.add_argument("--catalog", required=True, metavar="PATH",
                     help="catalog file or folder (local path, file://, s3a://, dbfs:/, abfss://)")
    run.add_argument("--output", required=True, metavar="DIR", help="folder for the output Delta tables")
    run.add_argument("--format", choices=CATALOG_FORMATS, default=None,
                     help="catalog format (default: ingest.format, 'auto' = from the path)")
    _add_config_args(run)
    return parser


def _config_from(args: argparse.Namespace) -> ProdsimConfig:
    overrides = list(args.overrides)
    if getattr(args, "format", None):
        overrides.append(f"ingest.format={args.format}")
    return load_config(args.conf, overrides)


def _precheck_catalog(path: str, config: ProdsimConfig) -> None:
    """Fail before Spark starts when the catalog is missing or lacks a required column."""
    from prodsim_spark import io
    from prodsim_spark.ingest import check_columns

    fmt = io.detect_format(path, config.ingest.format)
    columns = io.peek_columns(path, fmt, config.ingest)
    if columns is not None:
        check_columns(columns, config.ingest, path=path)


def cmd_run(args: argparse.Namespace) -> int:
    from prodsim_spark.pipeline import run_pipeline
    from prodsim_spark.session import get_session

    config = _config_from(args)
    _precheck_catalog(args.catalog, config)
    output = args.output
    if "://" not in output and not output.startswith("dbfs:"):
        output = str(Path(output).resolve())
    spark = get_session(config.spark)
    result = run_pipeline(spark, args.catalog, output, config)
    print(f"\nprodsim run: {result.rows} catalog rows -> {output}")
    print("  status:  " + ", ".join(f"{k} {v}" for k, v in result.status.items()))
    for code, count in result.reasons.items():
        print(f"  reason:  {code:<24} {count}")
    for name, path in result.tables.items():
        print(f"  table:   {name:<12} {path}")
    return 0


COMMANDS = {"run": cmd_run}


def main(argv: list[str] | None = None) -> int:
    from prodsim_spark.progress import setup_logging

    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return _EXIT_USAGE
    setup_logging(args.log_level)
    try:
        return COMMANDS[args.command](args)
    except ProdsimError as exc:
        print(f"prodsim {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
