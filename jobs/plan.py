"""Print the TorchRec sharding plan of a spec on a simulated cluster (no GPU needed).

    python jobs/plan.py --spec feature_specs/production_example.yaml --world-size 64 --device cuda --hbm-gb 80

Row counts come from `num_buckets` in the spec, else from the prepared vocabularies (jobs/prepare_data.py); frozen
text tables (text.mode llm) from the prepared text tables, else `text.tables[].num_rows`, at width text.reduce_dim.
Output is markdown: one row per table, memory per rank (summarised), and the planner's step-time estimate.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from recsys.cli import add_spec_args, load_spec_from_args, run_main, setup_logging  # noqa: E402
from recsys.models.tables import table_rows  # noqa: E402
from recsys.spec.config import Spec  # noqa: E402
from recsys.train.sharding import GIB, RESERVED_FRACTION, PlanResult, plan_for  # noqa: E402


def rows_for(spec: Spec) -> Dict[str, int]:
    """`num_buckets` where given, the prepared vocabulary sizes for the rest."""
    if all(t.num_buckets is not None for t in spec.tables):
        return table_rows(spec, {})
    from recsys.models.build import spec_table_rows

    return spec_table_rows(spec)  # prepared vocabularies; a clear error names jobs/prepare_data.py when missing


def rank_ranges(ranks: Sequence[int], world_size: int) -> str:
    """[0,1,2,3,7] -> '0-3,7'; every rank -> 'all'."""
    if len(ranks) == world_size and world_size > 1:
        return f"all {world_size}"
    parts: List[str] = []
    start = prev = None
    for r in sorted(ranks):
        if start is None:
            start = prev = r
        elif r == prev + 1:
            prev = r
        else:
            parts.append(f"{start}-{prev}" if prev != start else str(start))
            start = prev = r
    if start is not None:
        parts.append(f"{start}-{prev}" if prev != start else str(start))
    return ",".join(parts)


def _gib(b: float) -> str:
    return f"{b / GIB:.2f}"


def render(spec: Spec, result: PlanResult, top: int = 4) -> str:
    """The plan as markdown."""
    ws, dev = result.world_size, result.device_type
    caps = f"DDR {_gib(result.ddr_cap_bytes)} GiB"
    if dev == "cuda":
        caps = f"HBM {_gib(result.hbm_cap_bytes)} GiB, " + caps
    lines = [f"## Sharding plan: {spec.name} on {ws} x {dev} ({caps} per rank, "
             f"{RESERVED_FRACTION:.0%} kept for dense parts)", "",
             "| table | rows | dim | sharding | kernel | ranks | size GiB |",
             "| --- | ---: | ---: | --- | --- | --- | ---: |"]
    for t in sorted(result.tables, key=lambda t: t.bytes, reverse=True):
        lines.append(f"| {t.name} | {t.rows:,} | {t.dim} | {t.sharding_type} | {t.compute_kernel} | "
                     f"{rank_ranges(t.ranks, ws)} | {_gib(t.bytes)} |")
    total = sum(t.bytes for t in result.tables)
    lines += ["", f"Tables: {len(result.tables)}, {_gib(total)} GiB with optimiser state.", ""]

    what = "planner estimate: weights, optimiser state, I/O buffers" if result.memory_from_planner else "weights only"
    lines += [f"### Memory per rank ({what}, GiB)", "", "| | min | max | mean |", "| --- | ---: | ---: | ---: |"]
    tiers = [("HBM", "hbm_bytes"), ("DDR", "ddr_bytes")] if dev == "cuda" else [("DDR", "ddr_bytes")]
    if dev == "cpu" and not any(r.ddr_bytes for r in result.ranks):
        tiers = [("HBM", "hbm_bytes")]  # weights-only fallback books everything under one tier
    for label, attr in tiers:
        vals = [getattr(r, attr) for r in result.ranks]
        lines.append(f"| {label} | {_gib(min(vals))} | {_gib(max(vals))} | {_gib(sum(vals) / len(vals))} |")
    key = tiers[0][1]
    ordered = sorted(result.ranks, key=lambda r: getattr(r, key), reverse=True)
    shown = ordered[:top] + ([ordered[-1]] if len(ordered) > top else [])
    lines += ["", "| rank | " + " | ".join(label for label, _ in tiers) + " |",
              "| ---: | " + " | ".join("---:" for _ in tiers) + " |"]
    for r in shown:
        lines.append(f"| {r.rank} | " + " | ".join(_gib(getattr(r, a)) for _, a in tiers) + " |")
    if len(ordered) > top + 1:
        lines.append(f"(fullest {top} ranks and the emptiest of {ws})")
    lines.append("")
    if any(result.text_bytes):
        holding = [b for b in result.text_bytes if b]
        lines += [f"Frozen text tables (weights, {spec.text.dtype}): {_gib(sum(result.text_bytes))} GiB in all, on "
                  f"{len(holding)} of {ws} ranks, at most {_gib(max(result.text_bytes))} GiB per rank.", ""]
    if result.perf_ms is not None:
        lines.append(f"Planner estimate: {result.perf_ms:.2f} ms per step for embedding fwd+bwd+comms on the "
                     "slowest rank (TorchRec cost model, not a measurement).")
    else:
        lines.append("Planner estimate: not available on this rank.")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_spec_args(parser)
    parser.add_argument("--world-size", type=int, required=True, help="number of ranks (GPUs or CPU processes)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--hbm-gb", type=float, default=None, help="GPU memory per rank, GiB (default 32)")
    parser.add_argument("--ddr-gb", type=float, default=None, help="host memory per rank, GiB (default 128)")
    parser.add_argument("--local-world-size", type=int, default=None, help="ranks per host (default 8 on cuda)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="per-rank batch (default: train.batch_size / world size)")
    args = parser.parse_args(argv)
    setup_logging(rank=0)  # library warnings (TorchRec's "Sharding spec not found" per table) off the console
    spec = load_spec_from_args(args)
    text_rows, text_dim = None, None
    if spec.text.frozen and spec.used_text_tables():
        from recsys.text.frozen import planned_text_dim, planned_text_rows

        text_rows, text_dim = planned_text_rows(spec), planned_text_dim(spec)
    result = plan_for(spec, rows_for(spec), args.world_size, args.device, hbm_gb=args.hbm_gb, ddr_gb=args.ddr_gb,
                      batch_size=args.batch_size, local_world_size=args.local_world_size, text_rows=text_rows,
                      text_dim=text_dim)
    print(render(spec, result))
    return 0


if __name__ == "__main__":
    run_main(main)
