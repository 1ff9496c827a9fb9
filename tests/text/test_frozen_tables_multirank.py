"""A frozen text table sharded over 2 ranks gives the same outputs as on one rank, and training leaves it as
written (MovieLens tiny model with LLM text from the tiny test BERT)."""
from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from recsys.train.dist import GLOO_EXIT_ABORT

REPO = Path(__file__).resolve().parents[2]

# Every rank scores the SAME valid batch (a sharded EBC serves any local batch), then trains a few steps and checks
# that its shards of the text tables still hold the stored rows. The test asks for column-wise text tables with
# 8-wide shards (TorchRec's default floor is 128 columns) so the 16-wide movie table is really split over both
# ranks: each rank holds half of every row, and every lookup crosses ranks.
# Each rank writes its result to its own file: the two ranks share torchrun's stdout pipe, where rank 1's line once
# landed in front of rank 0's (multi-MB) result line, so no line began with the marker (a print's text and its newline
# are two writes unbuffered, and a write past the pipe's 4 KiB is not atomic either).
SCRIPT = r'''
import itertools, json, sys
from pathlib import Path
import numpy as np
import torch
import recsys.train.sharding as sharding
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from recsys.data.loader import BatchLoader
from recsys.spec.loader import load_spec
from recsys.train.dist import exit_process, init_distributed, shutdown
from recsys.train.loop import Trainer
from recsys.train.transfer import transfer_into

_text_constraints = sharding._text_constraints
def narrow_column_shards(spec, device_type):
    out = _text_constraints(spec, device_type)
    for c in out.values():
        c.min_partition = 8
    return out
sharding._text_constraints = narrow_column_shards

spec_path, init_path, out_dir, overrides = sys.argv[1], sys.argv[2], Path(sys.argv[3]), sys.argv[4:]
spec = load_spec(spec_path, overrides)
ctx = init_distributed("cpu")
state = torch.load(init_path)
trainer = Trainer(spec, ctx, for_training=False, init_hook=lambda tr: transfer_into(tr.dmp, spec, spec, state))
batch = next(iter(BatchLoader(spec, "valid", batch_size=64, shuffle=False, seed=0)))
trainer.dmp.eval()
with torch.no_grad():
    logits = trainer.dmp(batch)[1][1]
    vectors = trainer.model.l0.text_vectors(batch)
trainer.dmp.train()
loader = BatchLoader(spec, "train", batch_size=64, shuffle=False, seed=0)
pipeline = TrainPipelineSparseDist(trainer.dmp, trainer.optimizer, ctx.device, execute_all_batches=True)
it = itertools.islice(iter(loader), 3)
while True:
    try:
        pipeline.progress(it)
    except StopIteration:
        break
changed = 0
for key, value in trainer.dmp.state_dict().items():
    if ".text_ebc." in key:
        rows = trainer.text_tables[key.split(".")[-2][len("text_"):]]
        if not hasattr(value, "local_shards"):  # replicated (data_parallel): the whole table
            changed += int((value.numpy() != rows).sum())
            continue
        for shard in value.local_shards():
            (r0, c0), (nr, nc) = shard.metadata.shard_offsets, shard.metadata.shard_sizes
            changed += int((shard.tensor.numpy() != rows[r0:r0 + nr, c0:c0 + nc]).sum())
from torch.nn.parallel import DistributedDataParallel
text_ddp = sum(isinstance(m, DistributedDataParallel) for m in trainer.model.l0.text_ebc.modules())
result = {"changed": changed, "text_ddp": text_ddp}
if ctx.rank == 0:
    result.update(plan={t.name: [t.sharding_type, t.ranks] for t in trainer.plan.tables}, logits=logits.tolist(),
                  vectors={k: v.tolist() for k, v in vectors.items()})
tmp = out_dir / f"rank{ctx.rank}.json.tmp"
tmp.write_text(json.dumps(result))
tmp.replace(out_dir / f"rank{ctx.rank}.json")  # whole or absent
shutdown()
exit_process(0)
'''


def _run(cmd, env, out_dir: Path, world_size: int):
    """Runs the script (`cmd` ends with its arguments before `out_dir`) and returns rank 0's result and every rank's
    count of changed text-table values, in rank order."""
    out_dir.mkdir()
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    if res.returncode != 0 and GLOO_EXIT_ABORT in res.stderr:
        warnings.warn("gloo abort at exit recurred; rerun once")
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    results = [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(world_size)]
    assert all(r["text_ddp"] == 0 for r in results), "a frozen text lookup under DistributedDataParallel"
    return results[0], [r["changed"] for r in results]


# (placement asked for the movie texts, what the 2-rank plan must show): split by columns over both ranks, or
# replicated on request (TorchRec's data_parallel kernel, without the DDP wrapper TorchRec gives it: no gradient comes,
# the output is detached)
PLACEMENTS = [("column_wise", ["column_wise", [0, 1]]), ("data_parallel", ["data_parallel", [0, 1]])]


@pytest.mark.multirank
@pytest.mark.slow
@pytest.mark.parametrize("placement,planned", PLACEMENTS, ids=[p[0] for p in PLACEMENTS])
def test_sharded_text_table_matches_one_rank_and_stays_frozen(tiny_overrides, tiny_bert, tmp_path, child_env,
                                                              placement, planned):
    from recsys.models.build import build_model
    from recsys.models.model import TrainTask
    from recsys.spec.loader import load_spec
    from recsys.text import encode_text_tables

    overrides = tiny_overrides("text.mode=llm", f"text.encoder.model={tiny_bert}", f"text.cache_dir={tmp_path}/cache",
                               "text.encoder.device=cpu", "text.reduce_dim=16", "model.regularizer=none",
                               f"train.sharding_constraints.text_movies=[{placement}]")
    spec = load_spec(REPO / "feature_specs" / "movielens.yaml", overrides)
    encode_text_tables(spec, progress=False)
    torch.manual_seed(0)
    torch.save(TrainTask(build_model(spec, torch.device("cpu")), spec).state_dict(), tmp_path / "init.pt")
    script = tmp_path / "text_shards.py"
    script.write_text(SCRIPT)
    head = [str(script), str(REPO / "feature_specs" / "movielens.yaml"), str(tmp_path / "init.pt")]
    child_env["OMP_NUM_THREADS"] = "1"
    one, changed_one = _run([sys.executable, *head, str(tmp_path / "one"), *overrides], child_env,
                            tmp_path / "one", 1)
    two, changed_two = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             *head, str(tmp_path / "two"), *overrides], child_env, tmp_path / "two", 2)
    assert two["plan"]["text_movies"] == planned  # column_wise: really split, half of every row per rank
    assert one["plan"]["text_movies"][1] == [0]
    # the lookups are copies of stored fp16 rows: exactly equal, whatever the sharding
    for name in one["vectors"]:
        np.testing.assert_array_equal(np.array(two["vectors"][name]), np.array(one["vectors"][name]), err_msg=name)
    np.testing.assert_allclose(two["logits"], one["logits"], rtol=1e-6, atol=1e-6)
    assert np.abs(np.array(one["vectors"]["hist_text"])).sum() > 0  # the histories hold text at all
    assert changed_one == [0] and changed_two == [0, 0]  # training steps left every text row as written
