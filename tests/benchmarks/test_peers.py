"""Our re-implementations of the public peers (benchmarks/peers.py) train, on synthetic rows (no data files)."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks import peers  # noqa: E402


def _rows(n=512, users=50, items=40):
    g = torch.Generator().manual_seed(0)
    hist = torch.randint(1, items, (n, peers.HIST_LEN), generator=g)
    hist[torch.arange(peers.HIST_LEN)[None, :] >= torch.randint(0, peers.HIST_LEN + 1, (n, 1), generator=g)] = 0
    return {"user": torch.randint(1, users, (n,), generator=g), "item": torch.randint(1, items, (n,), generator=g),
            "hist": hist, "domain": torch.randint(0, 3, (n,), generator=g),
            "label": (torch.rand(n, generator=g) < 0.3).float(), "n_users": users, "n_items": items}


def test_peers_train_on_prebuilt_batches_and_report_a_rate():
    rows = _rows()
    for name in peers.MODELS:
        r = peers.time_peer(name, rows, batch=64, threads=1, steps=2, warmup=1, n_batches=4)
        assert r["samples_per_s"] > 0 and r["steps"] == 2 and r["batch"] == 64


def test_epnet_gate_sees_the_domain_but_does_not_train_the_embeddings():
    rows = _rows()
    model = peers.EPNet(rows["n_users"], rows["n_items"])
    batch = peers.prebuilt_batches(rows, 32, 1)[0]
    out = model(batch)
    assert out.shape == (32,) and bool(((out > 0) & (out < 1)).all())
    # the gate's input holds the embeddings detached: a loss on the gate alone reaches the domain table only
    x = model.embed(batch)
    gate = model.gate(torch.cat([model.domain(batch["domain"]), x.detach()], dim=1))
    gate.sum().backward()
    assert model.domain.weight.grad is not None and model.embed.user.weight.grad is None


def test_shared_bottom_reads_each_sample_from_its_own_domain_tower():
    rows = _rows()
    model = peers.SharedBottom(rows["n_users"], rows["n_items"]).eval()
    batch = peers.prebuilt_batches(rows, 64, 1)[0]
    out = model(batch)
    h = model.bottom(model.embed(batch))
    for d, tower in enumerate(model.towers):
        mask = batch["domain"] == d
        torch.testing.assert_close(out[mask], torch.sigmoid(tower(h[mask])).squeeze(1))
