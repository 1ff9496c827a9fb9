#!/usr/bin/env python
"""Rank one request with a bundle, in process (no server), and print the ranked candidates as JSON.

    python jobs/rank.py --bundle bundles/movielens --request docs/examples/movielens_request.json
    python jobs/rank.py --bundle bundles/movielens --request '{"domain": "ml_comedy", ...}'

The request format is POST /rank's (docs/serving.md); a bad request gets one line naming the field, exit code 2.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from recsys.cli import run_main, setup_logging  # noqa: E402
from recsys.errors import RecsysError  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", required=True, type=Path)
    p.add_argument("--request", required=True, help="a JSON file or a JSON string")
    p.add_argument("--verbose", action="store_true", help="show every library's log lines on the console")
    args = p.parse_args(argv)
    from pydantic import ValidationError

    from recsys.serving.ranker import Ranker

    # after torch is imported: setup_logging hands torch's own stderr handlers to the console filter, so a library
    # notice (torch.fx's is_fx_tracing deprecation, met in TorchRec's modules) does not land between the JSON lines
    setup_logging(verbose=args.verbose)

    text = Path(args.request).read_text() if not args.request.lstrip().startswith("{") else args.request
    ranker = Ranker.load(args.bundle)
    try:
        req = ranker.RankRequest.model_validate_json(text)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        loc = ".".join(str(x) for x in err["loc"]) or "request"
        raise RecsysError(f"--request {loc}: {err['msg']}") from None
    ranked = ranker.rank([req])[0]
    print(f'{{"domain": {json.dumps(req.domain)}, "ranked": [')
    print(",\n".join("  " + json.dumps(c) for c in ranked) + "]}")
    return 0


if __name__ == "__main__":
    run_main(main)
