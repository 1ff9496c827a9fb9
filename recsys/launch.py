"""`python -m recsys.launch [torchrun options] jobs/X.py [job arguments]`: torchrun, minus its noise on bad input.

torchrun works for every job, but when a worker exits non-zero torchrun itself raises `ChildFailedError` and prints
a 40-line traceback of the launcher after the worker's one `error:` line, and exits 1 whatever the worker's code was.
Workers cannot suppress that: it is the launcher's own process. This module *is* torchrun (its own argument parser
and `run()`; every torchrun option works the same) with three differences:

- the job's spec (`--spec` with its `--set` overrides) is loaded before any worker starts, so a bad spec is one
  `error:` line and exit 2 without starting processes;
- a failed worker ends the launch with that worker's exit code (2 = bad input, 130 = interrupted, 128+N = killed by
  signal N) and, unless the worker already reported bad input in its own `error:` line, one line naming the script,
  the rank and the code; no launcher traceback;
- torchrun's warnings (the OMP_NUM_THREADS banner, per-worker failure records) stay off the console unless the job
  is given `--verbose`. The jobs size their thread pools themselves (`recsys.train.dist.set_cpu_threads`), so
  OMP_NUM_THREADS=1, torchrun's own default for several ranks, is set quietly for libraries outside torch.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from typing import List, Optional

from recsys.cli import EXIT_BAD_INPUT, add_spec_args, load_spec_from_args, run_main

__all__ = ["main", "worker_exit_to_launcher_code"]


def check_spec_before_workers(script_args: List[str]) -> None:
    """Load the spec named by the job's `--spec` (after its `--set`s) once, here, so that every rank does not
    report the same bad spec. Jobs without `--spec` (none of the training jobs) are left to check themselves."""
    if "--spec" not in script_args and not any(a.startswith("--spec=") for a in script_args):
        return
    parser = argparse.ArgumentParser(add_help=False, exit_on_error=False)
    add_spec_args(parser)
    known, _ = parser.parse_known_args(script_args)  # the job's own parser checks its other arguments
    load_spec_from_args(known)


def worker_exit_to_launcher_code(exitcode: int) -> int:
    """A worker's exit status as a shell reports it: a negative status (killed by signal N) becomes 128 + N."""
    return 128 - exitcode if exitcode < 0 else exitcode


def _describe(exitcode: int) -> str:
    if exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exit code {exitcode}"


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args = parse_args(argv)
    script_args = list(args.training_script_args)
    check_spec_before_workers(script_args)
    if "--verbose" not in script_args:
        logging.getLogger("torch.distributed").setLevel(logging.CRITICAL)
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        run(args)
    except ChildFailedError as failed:
        rank, failure = failed.get_first_failure()
        code = worker_exit_to_launcher_code(failure.exitcode)
        if code != EXIT_BAD_INPUT:  # bad input was already said by the worker in one `error:` line
            print(f"error: {args.training_script} failed on rank {rank} ({_describe(failure.exitcode)}); its "
                  f"output is above, its log under the run folder's logs/", file=sys.stderr)
        return code
    except SignalException as stopped:  # Ctrl-C or a kill of the launcher: torchrun has stopped the workers
        print(f"error: {args.training_script} stopped by {stopped.sigval.name}", file=sys.stderr)
        return 128 + int(stopped.sigval)
    return 0


if __name__ == "__main__":
    run_main(main)
