"""Shared plumbing of the thin `jobs/*.py` scripts: spec arguments, logging, and error reporting.

A job looks like::

    def main(argv=None) -> int:
        parser = argparse.ArgumentParser(description=...)
        add_spec_args(parser)
        args = parser.parse_args(argv)
        setup_logging(verbose=args.verbose)
        spec = load_spec_from_args(args)
        ...
        return 0

    if __name__ == "__main__":
        run_main(main)

`run_main` turns bad input (`RecsysError`) into `error: <message>` on stderr with exit code 2 instead of a
traceback; set RECSYS_DEBUG=1 to get the traceback back.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Callable, Optional, Union

from recsys import startup_errors
from recsys.errors import RecsysError
from recsys.logs import attach_log_file, setup_logging  # noqa: F401  (re-exported for the jobs)
from recsys.spec.config import Spec
from recsys.spec.loader import load_spec

__all__ = ["add_spec_args", "load_spec_from_args", "run_main", "setup_logging", "attach_log_file", "EXIT_BAD_INPUT",
           "EXIT_INTERRUPTED"]

EXIT_BAD_INPUT = 2  # same code argparse uses for a bad command line
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C



def add_spec_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add `--spec PATH` (required) and repeatable `--set key.path=value` to `parser`."""
    parser.add_argument("--spec", required=True, metavar="PATH",
                        help="feature spec YAML, e.g. feature_specs/movielens.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one spec value (repeatable); list items by index or name, "
                             "e.g. --set model.fusion=mean --set domains.sci_rec.loss_weight=2")
    parser.add_argument("--verbose", action="store_true",
                        help="show every library's log lines on the console (default: they go to the log file in "
                             "the run folder, logs/<job>.rank<r>.log)")
    return parser


def add_evaluation_output_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The outputs and device of a job that ends in an evaluation (evaluate, finetune): `--out` metrics JSON,
    `--save-predictions` raw logits, `--device`."""
    parser.add_argument("--out", type=Path, help="metrics JSON")
    parser.add_argument("--save-predictions", type=Path,
                        help="raw logits in the split's row order (.npy; the independent scorer's input)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    return parser


def check_evaluation_outputs(args: argparse.Namespace) -> None:
    """A `--save-predictions` path that cannot be written fails when the job starts, not after the evaluation."""
    if args.save_predictions:
        from recsys.train.evaluation import check_output_file

        check_output_file(args.save_predictions, "--save-predictions")


def load_spec_from_args(args: argparse.Namespace) -> Spec:
    """The spec named by `--spec`, with every `--set` applied in order."""
    return load_spec(args.spec, list(getattr(args, "overrides", None) or []))


def _debug() -> bool:
    return os.environ.get("RECSYS_DEBUG", "").strip().lower() not in ("", "0", "false", "no")


def _report(message: str) -> None:
    # One `error:` prefix per line: a spec with several problems prints one self-contained line per problem.
    lines = str(message).strip().splitlines() or ["(no message)"]
    for line in lines:
        print(f"error: {line}", file=sys.stderr)


def run_main(main_fn: Callable[[], Union[int, None]]) -> None:
    """Run `main_fn()` and exit with its return code (None = 0).

    `RecsysError` / argparse errors -> `error: <message>` on stderr, exit 2, no traceback (RECSYS_DEBUG=1
    re-raises; under torchrun an error found before the process group starts is printed once per host, see
    recsys.startup_errors); Ctrl-C -> exit 130. Other exceptions are bugs and keep their traceback.
    """
    try:
        rc = main_fn()
    except (RecsysError, argparse.ArgumentError, argparse.ArgumentTypeError) as e:
        if _debug():
            raise
        _report_once_per_host(str(e))
        exit_with(EXIT_BAD_INPUT)
    except KeyboardInterrupt:
        if _debug():
            raise
        print("error: interrupted", file=sys.stderr)
        exit_with(EXIT_INTERRUPTED)
    finally:
        # a job that ended before starting a group (--dry-run, a bug) tells its host's other ranks it printed nothing
        startup_errors.publish_outcome("")
    exit_with(rc)


def _report_once_per_host(message: str) -> None:
    """Print `message`, except on a torchrun worker other than its host's first whose error came before the process
    group and whose first rank printed the same line (recsys.startup_errors says why it must be checked, not
    assumed). Errors after the group exists may differ by rank (a rank's data shard): every rank prints those."""
    if not startup_errors.under_torchrun() or _group_started():
        _report(message)
    elif startup_errors.is_host_first_rank():
        _report(message)
        startup_errors.publish_outcome(message)
    elif not startup_errors.shown_by_first_rank(message):
        _report(message)


def _group_started() -> bool:
    dist_mod = sys.modules.get("torch.distributed")
    return dist_mod is not None and dist_mod.is_available() and dist_mod.is_initialized()


def exit_with(code: Optional[int]) -> None:
    """sys.exit, except after a gloo process group ran here: then recsys.train.dist.exit_process (no interpreter
    finalisation, see there). A job that never imported the dist module never ran a group."""
    dist_module = sys.modules.get("recsys.train.dist")
    if dist_module is not None:
        dist_module.exit_process(code)
    sys.exit(int(code or 0))
