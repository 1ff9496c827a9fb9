"""Benchmarks: the plain-PyTorch EmbeddingBag collection agrees with TorchRec's, and the --quick modes of
benchmarks/auc.py and benchmarks/throughput.py run end to end on a tiny MovieLens model (seconds, not minutes)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

# Tiny model: narrow tables and aspects, 5-step histories, hashed-token text (no LLM cache needed).
TINY = ["model.dim=8", "model.hidden=[16,8]", "tables.user.dim=8", "tables.item.dim=8", "tables.genre.dim=4",
        "tables.query.dim=4", "features.hist_items.max_len=5", "features.hist_text.max_len=5", "text.mode=random",
        "text.random_buckets=4096", "text.random_dim=8", "text.random_max_tokens=8", "train.batch_size=256",
        "train.eval_batch_size=4096", "train.log_every_steps=1"]


@pytest.fixture(scope="module")
def tiny_sets(tmp_path_factory):
    from recsys.data.prepare import prepare
    from recsys.spec.loader import load_spec

    prepared = tmp_path_factory.mktemp("ml_prepared")
    prepare(load_spec(REPO / "feature_specs" / "movielens.yaml", [f"data.prepared_dir={prepared}"]))
    out = []
    for s in [f"data.prepared_dir={prepared}", *TINY]:
        out += ["--set", s]
    return out


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_plain_ebc_matches_torchrec_ebc():
    from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
    from torchrec.modules.embedding_modules import EmbeddingBagCollection
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from benchmarks.plain_reference import PlainEBC

    # `a` and `c` share table t1 but are not adjacent in the KJT (the gather path); h@0/h@1 are adjacent
    configs = [EmbeddingBagConfig(name="t1", embedding_dim=4, num_embeddings=10, feature_names=["a", "c"]),
               EmbeddingBagConfig(name="t2", embedding_dim=3, num_embeddings=7, feature_names=["b"],
                                  pooling=PoolingType.MEAN),
               EmbeddingBagConfig(name="t3", embedding_dim=2, num_embeddings=5, feature_names=["h@0", "h@1"])]
    ref = EmbeddingBagCollection(tables=configs, device=torch.device("cpu"))
    plain = PlainEBC(configs)
    with torch.no_grad():
        for c in configs:
            plain.embedding_bags[c.name].weight.copy_(ref.embedding_bags[c.name].weight)
    keys = ["a", "b", "c", "h@0", "h@1"]
    lengths = torch.tensor([1, 2, 0, 3, 1, 1, 1, 0, 2, 1])  # batch 2, a bag may be empty
    values = torch.randint(0, 5, (int(lengths.sum()),))
    kjt = KeyedJaggedTensor(keys=keys, values=values, lengths=lengths)
    want, got = ref(kjt).to_dict(), plain(kjt).to_dict()
    assert set(got) == set(keys)
    for k in keys:
        torch.testing.assert_close(got[k], want[k])
    sum(v.sum() for v in got.values()).backward()
    assert plain.embedding_bags["t1"].weight.grad.is_sparse  # sparse rows: Adagrad/DDP see only touched rows


def test_plain_task_trains_one_step(tiny_sets):
    from benchmarks.common import load
    from benchmarks.plain_reference import build_plain_task
    from recsys.data.loader import BatchLoader

    spec = load("movielens", tiny_sets[1::2])
    task, opts = build_plain_task(spec)
    batch = next(iter(BatchLoader(spec, "train", 64, seed=0)))
    before = task.model.l2.heads.w.detach().clone()
    loss, _ = task(batch)
    loss.backward()
    for o in opts:
        o.step()
    assert torch.isfinite(loss)
    assert not torch.equal(before, task.model.l2.heads.w)


@pytest.mark.slow
def test_auc_quick_runs_and_skips_finished(tiny_sets, tmp_path):
    cmd = [sys.executable, "benchmarks/auc.py", "--quick", "--nproc", "1", "--max-steps", "3", "--models",
           "sr_foundation", "popularity", "--runs-dir", str(tmp_path / "runs"), "--results-dir",
           str(tmp_path / "res"), *tiny_sets]
    p = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=170)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    report = json.loads((tmp_path / "res" / "movielens_auc.json").read_text())
    assert set(report["models"]) == {"sr_foundation", "popularity"}
    for m in report["models"].values():
        assert set(m["domains"]) == {"ml_action", "ml_comedy", "ml_drama", "ml_tag_search"}
    # the reported AUCs are the AUCs of what was predicted, recomputed here independently of the benchmark
    import collections

    import numpy as np
    import pyarrow.parquet as pq

    from recsys.metrics import auc

    prepared = Path(tiny_sets[1].split("=", 1)[1])
    test = pq.read_table(prepared / "test.parquet", columns=["item_id", "label"])
    labels = test["label"].to_numpy().astype(np.int64)
    counts = collections.Counter(pq.read_table(prepared / "train.parquet", columns=["item_id"])["item_id"].to_pylist())
    popularity = np.log1p(np.array([counts.get(i, 0) for i in test["item_id"].to_pylist()], dtype=np.float64))
    assert report["models"]["popularity"]["overall"]["auc"] == pytest.approx(auc(labels, popularity), abs=1e-9)
    pred = np.load(tmp_path / "runs" / "movielens" / "sr_foundation" / "seed1" / "test_pred.npy")
    assert len(pred) == len(labels)
    assert report["models"]["sr_foundation"]["overall"]["auc"] == pytest.approx(
        auc(labels, pred.astype(np.float64)), abs=1e-6)
    assert "| sr_foundation |" in (tmp_path / "res" / "movielens_auc.md").read_text()
    done = tmp_path / "runs" / "movielens" / "sr_foundation" / "seed1" / "metrics.json"
    stamp = done.stat().st_mtime_ns
    p = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "skip movielens/sr_foundation/seed1" in p.stderr
    assert done.stat().st_mtime_ns == stamp
    # another spec (here one more override for every run): the finished run no longer counts; it is moved aside
    # (kept) and run again, and the report holds only the new run
    first = json.loads(done.read_text())
    p = subprocess.run([*cmd, "--set", "model.reg_weight=0.2"], cwd=REPO, env=_env(), capture_output=True, text=True,
                       timeout=170)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert "was run with another spec" in p.stderr
    stale = list((tmp_path / "runs" / "movielens" / "sr_foundation" / "stale").glob("seed1-*/metrics.json"))
    assert len(stale) == 1 and json.loads(stale[0].read_text())["spec_fingerprint"] == first["spec_fingerprint"]
    second = json.loads(done.read_text())
    assert second["spec_fingerprint"] != first["spec_fingerprint"] and "model.reg_weight=0.2" in second["overrides"]
    report = json.loads((tmp_path / "res" / "movielens_auc.json").read_text())
    assert report["models"]["sr_foundation"]["seeds"] == [1]


@pytest.mark.slow
def test_throughput_quick(tiny_sets, tmp_path):
    """On a fresh machine (nothing prepared yet) the benchmark prepares what its launches read (on amazon-sr the
    peers' configuration reads a schema of its own: next test)."""
    fresh = [f"data.prepared_dir={tmp_path / 'prepared'}" if s.startswith("data.prepared_dir=") else s
             for s in tiny_sets]
    cmd = [sys.executable, "benchmarks/throughput.py", "--quick", "--data", "movielens", "--configs", "loader_1",
           "tr_peer_train_1_prebuilt",
           "--steps", "2", "--warmup", "1", "--results-dir", str(tmp_path), *fresh]
    p = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    report = json.loads((tmp_path / "throughput_movielens_quick.json").read_text())
    for name in ("loader_1", "tr_peer_train_1_prebuilt"):
        r = report["configs"][name]
        assert "error" not in r, r
        assert r["samples_per_s"] > 0 and r["peak_rss_mb_per_process"][0] > 0
    assert report["configs"]["tr_peer_train_1_prebuilt"]["prebuilt"] is True
    assert report["matmul_peak_gflops"] > 0 and report["flops"]["peer"]["flops_per_sample"] > 0
    # bf16's GEMM rate beside fp32's where bf16 is native (emulated it would take minutes): what auto can gain
    assert (report["matmul_peak_gflops_bf16"] or 0) > 0 if report["machine"]["bf16_native"] else \
        report["matmul_peak_gflops_bf16"] is None
    assert report["configs"]["tr_peer_train_1_prebuilt"]["flop_fraction_of_peak"] > 0
    m = report["machine"]  # every result names the machine it was measured on
    assert m["cpu_model"] and m["cpu_capability"] == torch.backends.cpu.get_cpu_capability() and m["cores"] >= 1
    assert m["cpu_capability"] in (tmp_path / "throughput_movielens_quick.md").read_text()


@pytest.mark.slow
def test_throughput_can_emulate_an_avx2_cpu(tiny_sets, tmp_path):
    """--emulate-isa avx2: every launch limited to AVX2 code paths with fp32 dense layers, and the report says so."""
    cmd = [sys.executable, "benchmarks/throughput.py", "--quick", "--data", "movielens", "--configs",
           "tr_peer_train_1_prebuilt", "--steps", "2", "--warmup", "1", "--emulate-isa", "avx2",
           "--results-dir", str(tmp_path), *tiny_sets]
    p = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    report = json.loads((tmp_path / "throughput_movielens_quick.json").read_text())
    assert "error" not in report["configs"]["tr_peer_train_1_prebuilt"]
    assert report["emulated_isa"]["ATEN_CPU_CAPABILITY"] == "avx2" and "train.precision=fp32" in report["overrides"]
    assert report["machine"]["cpu_capability"] in ("AVX2", "DEFAULT")  # ATen's dispatch in the benchmark itself
    assert "an older ISA emulated: ATEN_CPU_CAPABILITY=avx2" in (tmp_path / "throughput_movielens_quick.md").read_text()


def _report(configs):
    return {"data": "amazon_sr", "machine": {"cores": 2, "cpu_model": "Test CPU", "cpu_capability": "AVX2",
                                             "torch": "2", "commit": "c", "date": "d"},
            "global_batch": 4096, "steps": 2, "warmup": 1, "eval_batch": 16384, "matmul_peak_gflops": 100.0,
            "flops": {"full": {"flops_per_sample": 1e6}, "peer": {"flops_per_sample": 5e5}}, "configs": configs}


def _run(impl, variant, rate, nproc=1, **kw):
    return {"impl": impl, "task": "train", "variant": variant, "nproc": nproc, "world_size": nproc,
            "batch_per_rank": 4096 // nproc, "samples_per_s": rate, "peak_rss_mb_per_process": [900.0] * nproc,
            "load_avg_before": 0.5, "load_avg_after": 0.6, **kw}


def test_every_configuration_that_reads_prepared_data_gets_its_schema_prepared():
    from benchmarks import common
    from benchmarks.throughput import config_specs

    got = config_specs(["peer_epnet", "tr_peer_train_1_prebuilt", "tr_peer_train_1_prebuilt_fp32", "tr_full_train_1",
                        "plain_full_train_1", "tr_full_train_1_no_counts"], "amazon_sr", ["train.compile=off"])
    peer = common.peer_overrides("amazon_sr")
    assert got == [["train.compile=off"], [*peer, "train.compile=off"],
                   [*peer, "train.compile=off", "train.precision=fp32"], ["train.compile=off", "statistics.counts=[]"]]


def test_throughput_report_renders_with_only_some_configurations():
    """A run may measure a subset (e.g. --configs tr_full_train_2): ratios it cannot form say so."""
    from benchmarks.throughput import ratios, render

    configs = {"tr_full_train_2": _run("torchrec", "full", 61000.0, nproc=2)}
    report = {**_report(configs), "goals": ratios(configs)}
    text = render(report)
    assert report["goals"]["peer_goal_met"] is None and "-> not measured" in text
    assert "Test CPU (2 cores, torch CPU capability AVX2" in text


def test_peer_goal_is_a_ratio_to_the_fastest_peer_measured_in_the_same_run():
    from benchmarks.throughput import ratios, render

    configs = {"peer_epnet": _run("peer", "epnet", 100000.0, prebuilt=True),
               "peer_sharedbottom": _run("peer", "sharedbottom", 90000.0, prebuilt=True),
               "tr_peer_train_1_prebuilt": _run("torchrec", "peer", 160000.0, prebuilt=True),
               "tr_full_train_1": _run("torchrec", "full", 30000.0),
               "plain_full_train_1": _run("plain", "full", 40000.0)}
    g = ratios(configs)
    assert g["fastest_peer"] == "peer_epnet" and g["ratios"]["peers_config_prebuilt_vs_fastest_peer"] == 1.6
    assert g["peer_goal_met"] is True and g["full_goal_met"] is False  # 0.75x the plain reference
    text = render({**_report(configs), "goals": g})
    assert "1.60x" in text and "0.75x" in text and "-> met; full model" in text and "-> NOT met." in text
    configs["tr_peer_train_1_prebuilt"] = _run("torchrec", "peer", 140000.0, prebuilt=True)
    assert ratios(configs)["peer_goal_met"] is False
    # --load-robust: the same ratios on samples per CPU-second
    for name, per_cpu in (("peer_epnet", 50000.0), ("peer_sharedbottom", 60000.0),
                          ("tr_peer_train_1_prebuilt", 66000.0)):
        configs[name]["samples_per_cpu_s"] = per_cpu
    g = ratios(configs, "samples_per_cpu_s")
    assert g["fastest_peer"] == "peer_sharedbottom" and g["ratios"]["peers_config_prebuilt_vs_fastest_peer"] == 1.1
    assert "samples per CPU-second" in render({**_report(configs), "goals": g})


def test_auc_report_names_the_commits_its_runs_were_made_at():
    """The skip-if-finished fingerprint covers the spec, not the code: the table must say which code made it."""
    from benchmarks.auc import run_commits

    models = {"a": {"commits": ["abcdef0123", "abcdef0123", "unrecorded"]}, "b": {"commits": ["1234567890+dirty"]}}
    assert run_commits(models) == "`abcdef0` (2 runs), `unrecorded` (1 runs), `1234567+dirty` (1 runs)"
    assert run_commits({}) == "none"


def test_plain_task_runs_hybrid_text(llm_overrides):
    """The plain-PyTorch reference builds a text.mode hybrid model with both halves of its text (frozen rows in its
    text EBC, token tables beside them) and trains its token tables: the throughput benchmark's amazon-sr default."""
    from benchmarks.plain_reference import build_plain_task
    from recsys.data.loader import BatchLoader
    from recsys.spec.loader import load_spec

    spec = load_spec(REPO / "feature_specs" / "movielens.yaml", llm_overrides("text.mode=hybrid"))
    task, opts = build_plain_task(spec)
    l0 = task.model.l0
    assert l0.text_ebc is not None and set(l0.text_lookup) == {f"table_{t}" for t in spec.used_text_tables()}
    tokens = [m.tokens.weight for m in l0.text_lookup.values()]
    before = [w.detach().clone() for w in tokens]
    loss, _ = task(next(iter(BatchLoader(spec, "train", 64, seed=0))))
    loss.backward()
    for o in opts:
        o.step()
    assert torch.isfinite(loss)
    assert any(not torch.equal(b, w) for b, w in zip(before, tokens))


def test_coldstart_variant_needs_a_tag_and_names_its_overrides(tmp_path):
    """benchmarks/coldstart.py --set runs the protocol under a spec override; without --tag its results would
    overwrite the default's, so it is refused before any job starts; the rendered table says which override ran."""
    cmd = [sys.executable, "benchmarks/coldstart.py", "--data", "movielens", "--out-dir", str(tmp_path)]
    p = subprocess.run([*cmd, "--set", "text.mode=llm"], cwd=REPO, env=_env(), capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 2 and "--set needs --tag" in p.stderr and "Traceback" not in p.stderr
    p = subprocess.run([*cmd, "--set", "text.mode=llm", "--tag", "../x"], cwd=REPO, env=_env(), capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 2 and "letters, digits and _ only" in p.stderr
    assert not any(tmp_path.iterdir()), "nothing ran"

    import importlib.util

    loaded = importlib.util.spec_from_file_location("coldstart", REPO / "benchmarks" / "coldstart.py")
    coldstart = importlib.util.module_from_spec(loaded)
    loaded.loader.exec_module(coldstart)
    metrics = {"domains": {"d": {"auc": 0.7, "gauc": 0.6, "logloss": 0.5, "cold_auc": None}}}
    table = coldstart.render({"(a) zero-shot": metrics}, "d", "movielens", ["text.mode=llm"])
    assert "Every job with `--set text.mode=llm`" in table and "| (a) zero-shot | 0.7000 | 0.6000 | 0.5000 | n/a |" in table
