#!/usr/bin/env python
"""Serving latency and throughput: the real HTTP server under concurrent clients, beside the in-process API and the
model's own batch-inference rate R, all measured in one run on the same cores.

    python benchmarks/serving.py --bundle bundles/amazon_sr            # full: clients 1, 8, 32; ~6 min
    python benchmarks/serving.py --bundle B --rows test.parquet --quick # smoke test: clients 1, 2; seconds

Requests have `--candidates` (100) candidates built from the rows file (default: the amazon-sr test split): a row's
context (domain, user, history, query) and the item ids of that many rows of the same domain. R is `Ranker.score_table`
over rows of the file (mapping + model, the path of jobs/evaluate.py and jobs/score.py) in this process before the
server starts. Goals (issue 13): p99 <= 15 ms for one client; saturated candidates/s >= 0.8 R; at 8 clients
p99 <= 3 x the ideal 800 / R. The load generator (one thread per client, keep-alive HTTP/1.1) runs on the same
cores as the server, as the issue prescribes. Writes benchmarks/results/serving{_quick}.{json,md,png}.
"""
from __future__ import annotations

import argparse
import http.client
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, List

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402

GOAL_P99_ONE_MS = 15.0
GOAL_SATURATED_SHARE = 0.8
GOAL_P99_8_FACTOR = 3.0


def build_requests(ranker, rows_path: Path, n: int, candidates: int, seed: int = 0) -> List[Dict[str, Any]]:
    """`n` request dicts: context of a random row, candidates = item ids of random rows of its domain."""
    import pyarrow.parquet as pq

    cols = ranker.columns
    spec = ranker.spec
    need = list(dict.fromkeys([spec.data.domain_column, *cols.context, *cols.candidate]))
    t = pq.read_table(rows_path, columns=need).slice(0, 200_000).to_pydict()
    rng = np.random.default_rng(seed)
    dom_name = {d.match_value: d.name for d in spec.domains}
    domains = np.array(t[spec.data.domain_column], dtype=object)
    by_domain = {d: np.nonzero(domains == d)[0] for d in np.unique(domains) if d in dom_name}
    out = []
    for _ in range(n):
        d = list(by_domain)[rng.integers(len(by_domain))]
        idx = by_domain[d]
        i = idx[rng.integers(len(idx))]
        pick = idx[rng.integers(len(idx), size=candidates)]
        ctx = {c: t[c][i] for c in cols.context}
        out.append({"domain": dom_name[d], "context": ctx,
                    "candidates": [{c: t[c][j] for c in cols.candidate} for j in pick]})
    return out


def percentiles(lat_s: List[float]) -> Dict[str, float]:
    a = np.asarray(lat_s) * 1e3
    return {"p50_ms": float(np.percentile(a, 50)), "p95_ms": float(np.percentile(a, 95)),
            "p99_ms": float(np.percentile(a, 99)), "mean_ms": float(a.mean()), "n": int(len(a))}


def batch_rate(ranker, rows_path: Path, rows: int, repeat: int = 3) -> float:
    """R: rows/s of Ranker.score_table (best of `repeat`) over the file's first `rows` rows."""
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(rows_path)
    table = next(pf.iter_batches(batch_size=rows))
    import pyarrow as pa

    table = pa.Table.from_batches([table])
    ranker.score_table(table.slice(0, min(2048, table.num_rows)))  # warm-up
    best = 0.0
    for _ in range(repeat):
        t0 = time.perf_counter()
        ranker.score_table(table)
        best = max(best, table.num_rows / (time.perf_counter() - t0))
    return best


def in_process(ranker, bodies: List[Dict[str, Any]], n: int, batch: int) -> Dict[str, Any]:
    """Sequential Ranker.rank of one request at a time (latency) and of `batch` requests per call (throughput)."""
    reqs = [ranker.parse(b) for b in bodies]
    for r in reqs[:5]:
        ranker.rank([r])
    lat = []
    t0 = time.perf_counter()
    for k in range(n):
        s = time.perf_counter()
        ranker.rank([reqs[k % len(reqs)]])
        lat.append(time.perf_counter() - s)
    one = percentiles(lat)
    one["candidates_per_s"] = sum(len(reqs[k % len(reqs)].candidates) for k in range(n)) / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    done = 0
    for k in range(0, n, batch):
        chunk = [reqs[(k + j) % len(reqs)] for j in range(batch)]
        ranker.rank(chunk)
        done += sum(len(r.candidates) for r in chunk)
    return {"one_request": one, "batched": {"requests_per_call": batch,
                                            "candidates_per_s": done / (time.perf_counter() - t0)}}


def drive(host: str, port: int, payloads: List[bytes], clients: int, seconds: float, min_requests: int,
          n_candidates: int) -> Dict[str, Any]:
    """`clients` threads, each sending requests back to back on its own keep-alive connection."""
    lat: List[List[float]] = [[] for _ in range(clients)]
    errors = [0] * clients
    start = threading.Barrier(clients + 1)
    stop_at = [0.0]

    def client(c: int) -> None:
        conn = http.client.HTTPConnection(host, port, timeout=60)
        k = c
        start.wait()
        while time.perf_counter() < stop_at[0] or len(lat[c]) < min_requests:
            body = payloads[k % len(payloads)]
            k += clients
            t = time.perf_counter()
            conn.request("POST", "/rank", body=body, headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            resp.read()
            lat[c].append(time.perf_counter() - t)
            if resp.status != 200:
                errors[c] += 1
        conn.close()

    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(clients)]
    for th in threads:
        th.start()
    t0 = time.perf_counter()
    stop_at[0] = t0 + seconds
    start.wait()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t0
    all_lat = [x for c in lat for x in c]
    out = percentiles(all_lat)
    out.update(clients=clients, seconds=wall, requests_per_s=len(all_lat) / wall,
               candidates_per_s=len(all_lat) * n_candidates / wall, errors=int(sum(errors)))
    return out


def start_server(bundle: Path, port: int, log: Path, extra: List[str]) -> subprocess.Popen:
    env = common.env_for_children()
    proc = subprocess.Popen([common.PYTHON, str(common.REPO / "jobs" / "serve.py"), "--bundle", str(bundle),
                             "--port", str(port), *extra], stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env,
                            cwd=common.REPO)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited ({proc.returncode}): {log.read_text()[-2000:]}")
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", "/healthz")
            if c.getresponse().status == 200:
                return proc
        except OSError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit("server did not start within 600 s")


def plot(report: Dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    http_rows = report["http"]
    x = [r["clients"] for r in http_rows]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for key, style in (("p50_ms", "o-"), ("p95_ms", "s-"), ("p99_ms", "^-")):
        a1.plot(x, [r[key] for r in http_rows], style, label=key.replace("_ms", ""))
    a1.axhline(GOAL_P99_ONE_MS, color="grey", ls=":", label="goal p99, 1 client")
    a1.set_xscale("log", base=2)
    a1.set_xlabel("concurrent clients")
    a1.set_ylabel("latency (ms)")
    a1.set_title(f"HTTP /rank, {report['settings']['candidates']} candidates per request")
    a1.legend(fontsize=8)
    a2.plot(x, [r["candidates_per_s"] for r in http_rows], "o-", label="HTTP server")
    R = report["batch_rate_R"]
    a2.axhline(R, color="k", ls="--", label=f"R (batch inference) {R:,.0f}/s")
    a2.axhline(GOAL_SATURATED_SHARE * R, color="grey", ls=":", label="goal 0.8 R")
    a2.axhline(report["in_process"]["batched"]["candidates_per_s"], color="tab:green", ls="-.",
               label="in-process API, batched")
    a2.set_xscale("log", base=2)
    a2.set_xlabel("concurrent clients")
    a2.set_ylabel("candidates / s")
    a2.legend(fontsize=8)
    m = report["machine"]
    fig.suptitle(f"{report['bundle']} | {m['nproc']} x {m['cpu_model']} ({m['cpu_capability']}) | commit "
                 f"{m['commit'][:12]} | load {m['load_avg_1min']:.1f}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(report: Dict[str, Any]) -> str:
    m, s, R = report["machine"], report["settings"], report["batch_rate_R"]
    ip = report["in_process"]
    rows = [["in-process `Ranker.rank`, 1 request per call", "-", f"{ip['one_request']['p50_ms']:.2f}",
             f"{ip['one_request']['p95_ms']:.2f}", f"{ip['one_request']['p99_ms']:.2f}",
             f"{ip['one_request']['candidates_per_s']:,.0f}"],
            [f"in-process `Ranker.rank`, {ip['batched']['requests_per_call']} requests per call", "-", "", "", "",
             f"{ip['batched']['candidates_per_s']:,.0f}"]]
    for r in report["http"]:
        rows.append([f"HTTP server, {r['clients']} client(s)", str(r["n"]), f"{r['p50_ms']:.2f}", f"{r['p95_ms']:.2f}",
                     f"{r['p99_ms']:.2f}", f"{r['candidates_per_s']:,.0f}"])
    g = report["goals"]
    lines = [f"# Serving benchmark ({'quick' if s['quick'] else 'full'})", "",
             f"Bundle `{report['bundle']}` ({report['bundle_quantize']}), {s['candidates']} candidates per request "
             f"from `{s['rows']}`. Machine: {m['nproc']} x {m['cpu_model']}, torch CPU capability "
             f"`{m['cpu_capability']}`, commit `{m['commit']}`, {m['date']}, 1-min load average at start "
             f"{m['load_avg_1min']:.1f} (at end {report['load_avg_end']:.1f}); server and load generator share the "
             f"cores. Server: `jobs/serve.py{(' ' + s['server_args']) if s['server_args'] else ''}` "
             f"({report.get('server', '?')}).", "",
             f"Batch-inference rate R (`Ranker.score_table`, this run): **{R:,.0f} samples/s**.", "",
             common.markdown_table(["path", "requests", "p50 ms", "p95 ms", "p99 ms", "candidates/s"], rows), "",
             "| goal | target | measured | met |", "|---|---|---|---|"]
    for name, goal in g.items():
        lines.append(f"| {name} | {goal['target']} | {goal['measured']} | {'yes' if goal['met'] else 'no'} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", type=Path, default=common.REPO / "bundles" / "amazon_sr")
    p.add_argument("--rows", type=Path, default=common.AMAZON_RAW / "test.parquet")
    p.add_argument("--candidates", type=int, default=100)
    p.add_argument("--clients", default="1,8,32")
    p.add_argument("--seconds", type=float, default=30.0, help="per concurrency level")
    p.add_argument("--quick", action="store_true", help="smoke test: clients 1,2, a few seconds each")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--server-args", default="", help="extra jobs/serve.py arguments, e.g. '--workers 2'")
    p.add_argument("--out", type=Path, default=None, help="result prefix (default benchmarks/results/serving)")
    args = p.parse_args(argv)
    if not args.bundle.is_dir():
        raise SystemExit(f"error: --bundle {args.bundle}: not found (make one with jobs/export.py)")
    if not args.rows.is_file():
        raise SystemExit(f"error: --rows {args.rows}: not found")
    import torch

    from recsys.serving.ranker import Ranker

    clients = [1, 2] if args.quick else [int(c) for c in args.clients.split(",")]
    seconds = 2.0 if args.quick else args.seconds
    out = args.out or common.RESULTS / ("serving_quick" if args.quick else "serving")
    machine = common.machine()
    machine["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    ranker = Ranker.load(args.bundle, threads=os.cpu_count())
    print(f"bundle {args.bundle} loaded; measuring R ...", flush=True)
    R = batch_rate(ranker, args.rows, 4096 if args.quick else 32768, repeat=1 if args.quick else 3)
    print(f"R = {R:,.0f} samples/s", flush=True)
    bodies = build_requests(ranker, args.rows, 64 if args.quick else 512, args.candidates)
    ip = in_process(ranker, bodies, 20 if args.quick else 300, 8 if args.quick else 32)
    print(f"in-process: p99 {ip['one_request']['p99_ms']:.2f} ms, batched {ip['batched']['candidates_per_s']:,.0f} "
          f"candidates/s", flush=True)
    del ranker
    import orjson

    payloads = [orjson.dumps(b) for b in bodies]
    port = args.port or _free_port()
    log = out.with_suffix(".server.log")
    log.parent.mkdir(parents=True, exist_ok=True)
    proc = start_server(args.bundle, port, log, args.server_args.split())
    try:
        drive("127.0.0.1", port, payloads[:8], 1, 1.0, 5, args.candidates)  # warm-up
        http_rows = []
        for c in clients:
            r = drive("127.0.0.1", port, payloads, c, seconds, 10 if args.quick else 50, args.candidates)
            http_rows.append(r)
            print(f"{c:3d} clients: p50 {r['p50_ms']:.2f} p95 {r['p95_ms']:.2f} p99 {r['p99_ms']:.2f} ms, "
                  f"{r['candidates_per_s']:,.0f} candidates/s, errors {r['errors']}", flush=True)
    finally:
        proc.terminate()
        proc.wait(60)
    server = next((ln[ln.index("(") + 1:ln.rindex(")")] for ln in log.read_text().splitlines()
                   if ln.startswith("listening on") and "(" in ln), "?")  # e.g. "2 worker(s) x 1 torch thread(s)"
    one = next((r for r in http_rows if r["clients"] == 1), None)
    eight = next((r for r in http_rows if r["clients"] == 8), None)
    sat = max(r["candidates_per_s"] for r in http_rows)
    ideal8 = 8 * args.candidates / R * 1e3  # 8 clients x candidates at rate R: the 800 / R at 100
    goals = {"p99 at 1 client": {"target": f"<= {GOAL_P99_ONE_MS:.0f} ms",
                                 "measured": f"{one['p99_ms']:.2f} ms" if one else "n/a",
                                 "met": bool(one and one["p99_ms"] <= GOAL_P99_ONE_MS)},
             "saturated candidates/s": {"target": f">= 0.8 R = {GOAL_SATURATED_SHARE * R:,.0f}",
                                        "measured": f"{sat:,.0f} ({sat / R:.2f} R)",
                                        "met": bool(sat >= GOAL_SATURATED_SHARE * R)},
             "p99 at 8 clients": {"target": f"<= 3 x {8 * args.candidates}/R = {GOAL_P99_8_FACTOR * ideal8:.1f} ms",
                                  "measured": f"{eight['p99_ms']:.2f} ms" if eight else "n/a (not run)",
                                  "met": bool(eight and eight["p99_ms"] <= GOAL_P99_8_FACTOR * ideal8)}}
    report = {"bundle": common.shown_path(args.bundle), "bundle_quantize": _quantize(args.bundle), "machine": machine,
              "settings": {"candidates": args.candidates, "clients": clients, "seconds": seconds, "quick": args.quick,
                           "rows": common.shown_path(args.rows), "server_args": args.server_args},
              "server": server, "batch_rate_R": R, "in_process": ip, "http": http_rows, "goals": goals,
              "load_avg_end": common.load_average()}
    common.write_json(out.with_suffix(".json"), report)
    out.with_suffix(".md").write_text(markdown(report))
    plot(report, out.with_suffix(".png"))
    print(markdown(report))
    return 0


def _quantize(bundle: Path) -> str:
    import json

    return json.loads((bundle / "manifest.json").read_text()).get("quantize", "none")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    sys.exit(main())
