#!/usr/bin/env python
"""Our own plain-PyTorch re-implementation of two public peers, for timing only: Scenario-Wise-Rec's EPNet and
SharedBottom as that benchmark trains them on amazon-sr. Not their code (none of it is copied or imported): models
written here from the published architectures and the benchmark's documented settings, so the throughput benchmark
can time the peers side by side with our model in one launch, on whatever CPU it runs on.

What is reproduced (the settings that decide the cost of a step):
  * features: user id, candidate item id, the item history mean-pooled (padding masked, the history reads the item
    table), and for EPNet the domain id as the scenario feature; every embedding 16 wide, plain `nn.Embedding`
    (dense gradients, as the peers train them);
  * EPNet (the embedding personalisation network of PEPNet): a gate network on [domain embedding, stop-gradient
    of the other embeddings] -> Linear -> ReLU -> Linear -> 2 x sigmoid scales the concatenated embeddings, which
    feed an MLP 128-64-32 (each Linear + BatchNorm + ReLU) and a Linear to one logit;
  * SharedBottom: the concatenated embeddings -> a shared Linear 128 + BatchNorm + ReLU -> one tower per domain
    (Linear 8 + BatchNorm + ReLU, Linear to one logit), each sample read from its own domain's tower;
  * training: sigmoid + BCE loss, torch.optim.Adam (lr 1e-3, weight decay 1e-5) over every parameter including the
    tables, batch 4,096, batches built before the timed window (the peers time the step on pre-built batches).

    python benchmarks/peers.py                        # both peers, batch 4096, threads = cores
    python benchmarks/peers.py --models epnet --threads 2 --steps 30
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

EMB = 16
HIST_LEN = 20
DOMAINS = ("games_rec", "sci_rec", "sci_search")


# ---------------------------------------------------------------------------------------------------------- data
def load_rows(raw_dir: Path, split: str = "train") -> Dict[str, torch.Tensor]:
    """The peers' inputs from an amazon-sr split, ids label-encoded over the split (0 = history padding):
    user [N], item [N], hist [N, 20], domain [N], label [N] (float)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    t = pq.read_table(Path(raw_dir) / f"{split}.parquet", columns=["domain", "label", "user_id", "item_id",
                                                                    "hist_item_ids"])

    def encode(values, vocab):  # 1-based codes in `vocab` (an Arrow array of the distinct values)
        return np.asarray(pc.index_in(values, value_set=vocab).to_numpy(zero_copy_only=False), dtype=np.int64) + 1

    user_ids = t["user_id"].combine_chunks().cast("string")
    item_ids = t["item_id"].combine_chunks().cast("string")
    hist = t["hist_item_ids"].combine_chunks()
    hist_flat = pc.list_flatten(hist).cast("string")
    users = pc.unique(user_ids)
    items = pc.unique(pa.concat_arrays([item_ids, hist_flat]))
    n = t.num_rows
    lengths = np.minimum(np.asarray(pc.list_value_length(hist).to_numpy(zero_copy_only=False)), HIST_LEN)
    flat = encode(hist_flat, items)
    offsets = np.asarray(hist.offsets.to_numpy()) - int(hist.offsets[0].as_py())
    padded = np.zeros((n, HIST_LEN), dtype=np.int64)
    cols = np.arange(HIST_LEN)
    take = cols[None, :] < lengths[:, None]
    padded[take] = flat[(offsets[:-1, None] + cols[None, :])[take]]
    domain = encode(t["domain"].combine_chunks().cast("string"), pa.array(list(DOMAINS), type=pa.string())) - 1
    return {"user": torch.from_numpy(encode(user_ids, users)), "item": torch.from_numpy(encode(item_ids, items)),
            "hist": torch.from_numpy(padded), "domain": torch.from_numpy(domain.astype(np.int64)),
            "label": torch.from_numpy(np.asarray(t["label"].to_numpy(), dtype=np.float32)),
            "n_users": len(users) + 1, "n_items": len(items) + 1}


def prebuilt_batches(rows: Dict[str, torch.Tensor], batch: int, n: int, seed: int = 0) -> List[Dict]:
    """`n` shuffled batches, materialised before timing (contiguous tensors, as a DataLoader hands them over)."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(rows["label"]), generator=g)[:batch * n]
    keys = ("user", "item", "hist", "domain", "label")
    return [{k: rows[k][perm[i * batch:(i + 1) * batch]].contiguous() for k in keys} for i in range(n)]


# -------------------------------------------------------------------------------------------------------- models
def _mlp(dims: List[int], input_dim: int, output_logit: bool) -> nn.Sequential:
    """Linear + BatchNorm + ReLU per hidden width (the peers' MLP block), optionally a final Linear to 1."""
    layers: List[nn.Module] = []
    for width in dims:
        layers += [nn.Linear(input_dim, width), nn.BatchNorm1d(width), nn.ReLU()]
        input_dim = width
    if output_logit:
        layers.append(nn.Linear(input_dim, 1))
    return nn.Sequential(*layers)


class PeerEmbeddings(nn.Module):
    """user, item and mean-pooled history embeddings concatenated: [B, 48]."""

    def __init__(self, n_users: int, n_items: int):
        super().__init__()
        self.user = nn.Embedding(n_users, EMB)
        self.item = nn.Embedding(n_items, EMB)

    def forward(self, b: Dict[str, torch.Tensor]) -> torch.Tensor:
        mask = (b["hist"] != 0).float().unsqueeze(1)  # [B, 1, L]
        hist = torch.bmm(mask, self.item(b["hist"])).squeeze(1) / (mask.sum(-1) + 1e-16)
        return torch.cat([self.user(b["user"]), self.item(b["item"]), hist], dim=1)


class EPNet(nn.Module):
    def __init__(self, n_users: int, n_items: int, n_domains: int = len(DOMAINS), mlp=(128, 64, 32)):
        super().__init__()
        self.embed = PeerEmbeddings(n_users, n_items)
        self.domain = nn.Embedding(n_domains, EMB)
        agnostic = 3 * EMB
        self.gate = nn.Sequential(nn.Linear(agnostic + EMB, agnostic), nn.ReLU(), nn.Linear(agnostic, agnostic),
                                  nn.Sigmoid())
        self.mlp = _mlp(list(mlp), agnostic, output_logit=True)

    def forward(self, b: Dict[str, torch.Tensor]) -> torch.Tensor:
        x = self.embed(b)
        scale = 2.0 * self.gate(torch.cat([self.domain(b["domain"]), x.detach()], dim=1))
        return torch.sigmoid(self.mlp(x * scale)).squeeze(1)


class SharedBottom(nn.Module):
    def __init__(self, n_users: int, n_items: int, n_domains: int = len(DOMAINS), bottom=(128,), tower=(8,)):
        super().__init__()
        self.embed = PeerEmbeddings(n_users, n_items)
        self.bottom = _mlp(list(bottom), 3 * EMB, output_logit=False)
        self.towers = nn.ModuleList(_mlp(list(tower), bottom[-1], output_logit=True) for _ in range(n_domains))

    def forward(self, b: Dict[str, torch.Tensor]) -> torch.Tensor:
        h = self.bottom(self.embed(b))
        out = torch.zeros(h.shape[0], 1)
        for d, tower in enumerate(self.towers):  # every tower runs on the whole batch, its domain's rows kept
            out = torch.where((b["domain"] == d).unsqueeze(1), torch.sigmoid(tower(h)), out)
        return out.squeeze(1)


MODELS = {"epnet": EPNet, "sharedbottom": SharedBottom}


# -------------------------------------------------------------------------------------------------------- timing
def time_peer(name: str, rows: Dict, batch: int = 4096, threads: int = 2, steps: int = 30, warmup: int = 5,
              n_batches: int = 16, seed: int = 0) -> Dict[str, float]:
    """Samples/s of the peer's training step on pre-built batches with `threads` intra-op threads."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    model = MODELS[name](rows["n_users"], rows["n_items"])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-5)
    loss_fn = nn.BCELoss()
    batches = prebuilt_batches(rows, batch, n_batches, seed)
    model.train()

    def step(b) -> None:
        loss = loss_fn(model(b), b["label"])
        model.zero_grad()
        loss.backward()
        opt.step()

    for i in range(warmup):
        step(batches[i % n_batches])
    cpu0, t0 = time.process_time(), time.perf_counter()
    for i in range(steps):
        step(batches[i % n_batches])
    seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    return {"samples_per_s": steps * batch / seconds, "seconds": seconds, "cpu_seconds": cpu, "steps": steps,
            "batch": batch, "threads": threads}


def main(argv=None) -> int:
    from benchmarks import common
    from recsys import hardware

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=hardware.cpu_info().cores)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    args = ap.parse_args(argv)
    why = common.data_available("amazon_sr")
    if why:
        print(f"skip: {why}")
        return 0
    rows = load_rows(common.AMAZON_RAW)
    print(hardware.describe())
    for name in args.models:
        r = time_peer(name, rows, args.batch, args.threads, args.steps, args.warmup)
        print(json.dumps({"model": name, **r}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
