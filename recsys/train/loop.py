"""The one training loop: meta-device model -> in-backward embedding optimiser -> DistributedModelParallel (the
planner's sharding) -> dense Adam -> the training step (TorchRec's TrainPipelineSparseDist; one CPU process: a plain
step, recsys.train.step), with per-epoch evaluation on valid, best-epoch selection, crash-safe checkpoints, exact
resume, TensorBoard scalars and a progress bar on rank 0."""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from recsys import hardware
from recsys.errors import CheckpointError, NumericsError, RecsysError
from recsys.data.resolved import check_checkpoint_schema, schema_for
from recsys.logs import CONSOLE
from recsys.models.build import build_model, spec_table_rows, text_inputs_for
from recsys.provenance import code_commit
from recsys.models.model import SRFoundationModel, TrainTask
from recsys.models.precision import resolve_precision
from recsys.spec.config import Spec
from recsys.spec.loader import dump_resolved, resolve_path, resolved_values, spec_hash
from recsys.train import checkpoint, update_path
from recsys.train.dist import DistContext
from recsys.train.evaluation import evaluate_split, json_safe
from recsys.train.frozen_text import fill_text_tables, is_text_table_key
from recsys.train.numerics import FiniteGradGuard, describe_batch
from recsys.train.report import epoch_line, plan_table
from recsys.train.sharding import data_parallel_wrapper_for, pin_kjt_order, plan_for, sharders_for
from recsys.train.step import make_train_step
from recsys.train.weight_average import WeightAverage

log = logging.getLogger("recsys.train.loop")
TRAINING_WEIGHTS = "training_weights"  # a checkpoint's entry for them under a weight average (see Trainer.save)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def _embedding_optimizer(name: str):
    from torchrec.optim import rowwise_adagrad

    if name == "rowwise_adagrad":
        return rowwise_adagrad.RowWiseAdagrad, {}
    if name == "adagrad":
        return torch.optim.Adagrad, {}
    if name == "sgd":
        return torch.optim.SGD, {}
    return torch.optim.Adam, {}


def freeze_by_prefix(model: nn.Module, prefixes: Sequence[str]) -> List[str]:
    """Set requires_grad=False on every parameter under the given level prefixes (`l0`, `l1`, `l2.tower`, ...).
    A prefix matching nothing is an error: a typo must not silently train everything."""
    frozen: List[str] = []
    names = [n for n, _ in model.named_parameters()]
    for prefix in prefixes:
        hits = [n for n in names if n == prefix or n.startswith(prefix + ".")]
        if not hits:
            raise RecsysError(f"--freeze {prefix!r}: matches no parameter (levels: l0, l1, l2)")
        frozen.extend(hits)
    for n, p in model.named_parameters():
        if n in frozen:
            p.requires_grad_(False)
    return frozen


@dataclass
class RunState:
    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    best_metric: float = -math.inf
    best_epoch: int = -1
    best_checkpoint: Optional[str] = None
    history: List[Dict[str, Any]] = field(default_factory=list)


class Trainer:
    def __init__(self, spec: Spec, ctx: DistContext, freeze: Sequence[str] = (),
                 init_hook=None, for_training: bool = True, text_projection=None,
                 fresh_rows: Optional[Dict[str, np.ndarray]] = None):
        """`text_projection`: the projection of the frozen text tables (a fine-tune passes its pretrained model's,
        `recsys.train.transfer.pretrained_text_projection`); None: the one fitted on this spec's tables.
        `fresh_rows`: table -> rows pretraining never updated, which stay trainable under `freeze`."""
        self.spec, self.ctx = spec, ctx
        # Large step tensors (the text tables' [batch, 43 x 64] lookup output is 45 MB on amazon-sr) then reuse heap
        # pages instead of fresh mmap'd ones that are faulted in, zero-filled, at every step: on the 2-core Xeon a
        # fresh 45 MB buffer took ~24 ms to first write, a reused one ~8 ms (recsys.hardware.keep_freed_memory)
        hardware.keep_freed_memory()
        self.precision, why = resolve_precision(spec.train.precision, ctx.device.type)
        if ctx.is_main:
            log.info("dense precision %s: %s", self.precision, why)
        self.out_dir = resolve_path(spec, spec.train.output_dir)
        self.ckpt_root = self.out_dir / "checkpoints"
        seed_everything(spec.train.seed)
        self.rows = spec_table_rows(spec)
        self.text_tables, self.text_projection = text_inputs_for(spec, text_projection)
        model = build_model(spec, torch.device("meta"), self.rows, self.text_tables, self.text_projection)
        # FBGEMM's loop backward for the one-feature tables where this CPU runs it faster (recsys/train/update_path.py)
        # (a resumed run takes its first start's choice again: the two paths round differently)
        record = self.out_dir / "embedding_update_path.json"
        resuming = for_training and bool(checkpoint.list_checkpoints(self.ckpt_root))
        self.loop_path_tables, why = update_path.choose(spec, ctx, model.l0.ebc.embedding_bag_configs(),
                                                        record if resuming else None)
        update_path.take_loop_path(model.l0, self.loop_path_tables)
        if ctx.is_main:
            log.info("embedding update path: %s", why)
            if for_training:
                update_path.write_record(record, self.loop_path_tables, why)
        self.frozen = freeze_by_prefix(model, freeze) if freeze else []
        frozen_tables = {n.split(".")[-2] for n in self.frozen if ".embedding_bags." in n}
        frozen_tables |= {t.name for t in spec.tables if not t.trainable}
        model.l0.freeze_tables(frozen_tables, fresh_rows)
        for p in model.l0.ebc.parameters():  # tables freeze by detaching their outputs (see freeze_tables)
            p.requires_grad_(True)
        self.task = TrainTask(model, spec)
        # Sparse optimiser applied in backward (fused into the embedding kernels by the sharder).
        opt_cls, extra = _embedding_optimizer(spec.train.embedding_optimizer)
        apply_optimizer_in_backward(opt_cls, list(model.l0.ebc.parameters()),
                                    dict(lr=spec.train.embedding_lr, **extra))
        plan = plan_for(spec, self.rows, ctx.world_size, ctx.device.type, pg=dist.group.WORLD, module=self.task)
        self.plan = plan
        if ctx.is_main and for_training:
            log.info("%s", plan_table(plan, self.precision), extra=CONSOLE)
        self.dmp = DistributedModelParallel(module=self.task, device=ctx.device, plan=plan.plan,
                                            sharders=sharders_for(ctx.device.type,
                                                                  comm_precision=spec.train.embedding_comm,
                                                                  text_dtype=spec.text.dtype),
                                            data_parallel_wrapper=data_parallel_wrapper_for(ctx.world_size))
        if spec.text.frozen:
            fill_text_tables(self.dmp, self.text_tables)  # each rank reads only its shards' rows
        self.kjt_order = pin_kjt_order(self.dmp, spec)  # batches the sharded tables read without a permute
        if init_hook is not None:
            init_hook(self)
        dense = dict(in_backward_optimizer_filter(self.dmp.named_parameters()))
        dense = {k: v for k, v in dense.items() if v.requires_grad and not is_text_table_key(k)}
        # Tables the plan made data_parallel run TorchRec's dense kernel: their gradients are all-reduced by DDP
        # and no in-backward optimiser is attached, so without this they would silently train under the dense
        # layers' Adam. They get the spec's embedding optimiser and rate instead, stepped with the dense ones.
        dp_tables = {k: dense.pop(k) for k in list(dense) if ".l0.ebc." in k}
        self.dense_optimizer = KeyedOptimizerWrapper(
            dense, lambda ps: torch.optim.Adam(ps, lr=spec.train.lr, weight_decay=spec.train.weight_decay,
                                               fused=True))  # one kernel per tensor (CPU and CUDA) for ~8 ops
        self.table_optimizer = (KeyedOptimizerWrapper(dp_tables, lambda ps: opt_cls(ps, lr=spec.train.embedding_lr,
                                                                                     **extra))
                                if dp_tables else None)
        self.optimizer = CombinedOptimizer([self.dmp.fused_optimizer, self.dense_optimizer,
                                            *([self.table_optimizer] if self.table_optimizer else [])])
        # what the finite-gradient guard checks before a step: every gradient the step applies
        self.stepped_params: Dict[str, torch.Tensor] = {**dense, **dp_tables}
        self.average: Optional[WeightAverage] = None
        if spec.train.ema_decay is not None:
            self.average = WeightAverage(self._averaged_weights(), spec.train.ema_decay)
            if ctx.is_main:
                log.info("weight average (decay %g) over %s values on rank 0", spec.train.ema_decay,
                         f"{self.average.numel:,}")
        self.state = RunState()
        self.compiled: Optional[bool] = None  # train.compile's answer, decided when the run's length is known
        self._loaders: Dict[str, Any] = {}  # split -> its BatchLoader, kept across epochs (see _loader)
        self.live = None
        if for_training and spec.train.live_metrics_window > 0:
            from recsys.train.live_metrics import LiveMetrics

            self.live = LiveMetrics(spec, spec.train.batch_size // ctx.world_size, ctx.world_size, ctx.rank,
                                    ctx.device, dist.group.WORLD if dist.is_initialized() else None)
        self.writer = None
        if ctx.is_main and for_training:
            from torch.utils.tensorboard import SummaryWriter

            self.out_dir.mkdir(parents=True, exist_ok=True)
            self.writer = SummaryWriter(str(self.out_dir / "tensorboard"))

    def _averaged_weights(self) -> Dict[str, torch.Tensor]:
        """The dense weights this run trains: not the TorchRec tables (recsys/train/weight_average.py says why),
        not frozen layers."""
        return {k: p for k, p in self.dmp.named_parameters()
                if p.requires_grad and not is_text_table_key(k) and ".l0.ebc." not in f".{k}"}

    def _aside_state(self) -> Optional[Dict[str, Any]]:
        """What a checkpoint holds beside the model and optimiser: the training weights, while `averaged()` has the
        average in their place (None without a weight average)."""
        return {TRAINING_WEIGHTS: self.average.state_dict()} if self.average is not None else None

    def averaged(self):
        """A block in which the model holds the weight average (train.ema_decay); nothing changes without one."""
        return self.average.swapped() if self.average is not None else contextlib.nullcontext()

    def compile_dense(self, planned_steps: Optional[int]) -> bool:
        """Apply `train.compile` (recsys/models/compiled.py) for a run of `planned_steps` training steps in this
        process; logs the choice and why. Decided once per Trainer: a later call returns the first answer."""
        from recsys.models.compiled import compile_dense_layers, resolve_compile

        if self.compiled is not None:
            return self.compiled
        self.compiled, why = resolve_compile(self.spec.train.compile, self.ctx.device.type, planned_steps)
        if self.ctx.is_main:
            log.info("dense layers %s: %s", "compiled" if self.compiled else "plain", why)
        if self.compiled:
            compile_dense_layers(self.model)
        return self.compiled

    # ------------------------------------------------------------------------------------------------ model views
    @property
    def model(self) -> SRFoundationModel:
        return self.dmp.module.model

    def _loader(self, split: str, epoch: int):
        """The split's loader, built once and kept across epochs: its decoded row groups and the mapped rows it
        stores for later epochs (when they fit: MovieLens, amazon-sr) are then read and mapped once per training, not
        once per epoch. The batch order depends only on (seed, epoch), so reusing it changes no batch."""
        from recsys.data.loader import BatchLoader

        loader = self._loaders.get(split)
        if loader is None:
            workers = self.spec.train.loader_workers
            if workers is None:  # auto (see TrainSpec.loader_workers)
                workers = 1 if self.ctx.device.type == "cuda" else 0
            loader = BatchLoader(self.spec, split, batch_size=self.spec.train.batch_size // self.ctx.world_size,
                                 rank=self.ctx.rank, world_size=self.ctx.world_size, seed=self.spec.train.seed,
                                 shuffle=self.spec.train.shuffle, workers=workers, prefetch=workers > 0,
                                 pin_memory=self.ctx.device.type == "cuda", kjt_order=self.kjt_order)
            self._loaders[split] = loader
        loader.set_epoch(epoch)
        return loader

    # --------------------------------------------------------------------------------------------------- resume
    def _meta(self, loader_state: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        """Everything besides tensors that an exact resume needs. Collective (gathers every rank's RNG states)."""
        rng = _rng_state()
        if dist.is_initialized() and self.ctx.world_size > 1:
            per_rank: List[Any] = [None] * self.ctx.world_size
            dist.all_gather_object(per_rank, rng)
        else:
            per_rank = [rng]
        return {
            "epoch": self.state.epoch,
            "step_in_epoch": self.state.step_in_epoch,
            "global_step": self.state.global_step,
            "best_metric": self.state.best_metric,
            "best_epoch": self.state.best_epoch,
            "best_checkpoint": self.state.best_checkpoint,
            "history": self.state.history,
            "spec_hash": spec_hash(self.spec),
            "spec": resolved_values(self.spec),  # what --resume compares and fine-tuning rebuilds the model from
            "spec_fingerprint": spec_hash(self.spec, paths=False),
            "schema_sha256": schema_for(self.spec).sha256,  # what the tables and ids meant when trained
            "world_size": self.ctx.world_size,
            "batch_size": self.spec.train.batch_size,
            "seed": self.spec.train.seed,
            "tables": self._table_shapes(),
            "rng": per_rank,  # one entry per rank: torch / numpy / python RNG states
            "torch_rng": torch.get_rng_state().tolist(),
            "recsys_version": __import__("recsys").__version__,
            "commit": code_commit(),
        }

    def _table_shapes(self) -> Dict[str, List[int]]:
        return checkpoint.table_shapes(self.spec, self.rows)

    def finite_grad_guard(self) -> FiniteGradGuard:
        """The optimiser the training step runs: refuses non-finite dense gradients. On CUDA the check is deferred
        (no host sync per step): the fused Adam skips a bad step on the device, and the data-parallel tables'
        optimiser (small tables, by the planner's choice) is undone there."""
        tables = [self.table_optimizer._optimizer] if self.table_optimizer else []
        return FiniteGradGuard(self.optimizer, self.stepped_params, defer=self.ctx.device.type == "cuda",
                               device_skippable=[self.dense_optimizer._optimizer], restorable=tables)

    def save(self, protect_best: bool = True) -> Path:
        protect = (self.out_dir / self.state.best_checkpoint) if (protect_best and self.state.best_checkpoint) \
            else None
        # the average goes where the weights are read from (evaluation, export, fine-tuning), the training weights
        # beside it for a resume
        with self.averaged():
            return checkpoint.save(self.ckpt_root, self.state.global_step, self.dmp, self.optimizer, self._meta(),
                                   self.spec.train.keep_checkpoints, protect, self._aside_state())

    def resume(self, allow_spec_change: bool = False) -> bool:
        """Load the newest good checkpoint of this run; False when there is none. Broken newer checkpoints are
        reported, skipped and renamed `<name>.bad` (they belong to an abandoned timeline); a checkpoint that
        cannot continue this spec (other tables, world size, batch size or seed) raises CheckpointError, and so does
        one trained with other spec values (unless `allow_spec_change`; see checkpoint.RESUME_MAY_CHANGE)."""
        found = checkpoint.latest_good(self.ckpt_root)
        if found is None:
            return False
        manifest = checkpoint.verify(found)
        checkpoint.check_resumable(found, manifest, tables=self._table_shapes(), world_size=self.ctx.world_size,
                                   batch_size=self.spec.train.batch_size, seed=self.spec.train.seed,
                                   spec_values=resolved_values(self.spec), allow_spec_change=allow_spec_change)
        # Adam's state is created lazily by its first step: a fresh optimiser's state_dict has no exp_avg/step
        # entries, so DCP would load nothing into it and the resumed run would restart Adam from zero. A dummy
        # zero-gradient step creates the entries; the load below then overwrites them and the weights.
        # Parameters that never had a gradient (unused in this spec) have no state in the checkpoint: drop theirs.
        self.dense_optimizer.init_state()
        self.dense_optimizer.zero_grad(set_to_none=True)
        saved = checkpoint.saved_keys(found)
        if self.average is not None and not any(k.startswith(TRAINING_WEIGHTS + ".") for k in saved):
            raise CheckpointError(f"{found}: was trained without train.ema_decay, so it holds no training weights "
                                  f"beside an average; resume it without train.ema_decay")
        with_state = {k[len("optim.state."):].rsplit(".", 1)[0] for k in saved if k.startswith("optim.state.")}
        for name, p in self.dense_optimizer.params.items():
            if name not in with_state:
                self.dense_optimizer.state.pop(p, None)
        with self.averaged():  # as saved: the average in the weights' place, the training weights aside
            manifest = checkpoint.load(found, self.dmp, self.optimizer, self._aside_state())
        for k in ("epoch", "step_in_epoch", "global_step", "best_metric", "best_epoch", "best_checkpoint",
                  "history"):
            setattr(self.state, k, manifest[k])
        # older manifests hold an absolute path (of wherever the run folder was then)
        self.state.best_checkpoint = checkpoint.best_relative(self.state.best_checkpoint)
        rngs = manifest.get("rng")
        if rngs and len(rngs) == self.ctx.world_size:
            _set_rng_state(rngs[self.ctx.rank])
        else:
            torch.set_rng_state(torch.tensor(manifest["torch_rng"], dtype=torch.uint8))
        if self.ctx.is_main:
            checkpoint.set_aside_newer(self.ckpt_root, found)
        if dist.is_initialized():
            dist.barrier()
        log.info("resumed from %s (epoch %d, step %d in epoch, global step %d)", found, self.state.epoch,
                 self.state.step_in_epoch, self.state.global_step, extra=CONSOLE)
        return True

    # ---------------------------------------------------------------------------------------------------- train
    def fit(self) -> Dict[str, Any]:
        spec = self.spec
        if self.ctx.is_main:  # written here, not at construction: a refused --resume must leave the old one
            (self.out_dir / "spec.resolved.yaml").write_text(dump_resolved(spec))
        per_epoch = self._steps_in_epoch(self._loader("train", self.state.epoch))
        self.compile_dense(per_epoch * (spec.train.epochs - self.state.epoch) - self.state.step_in_epoch)
        for epoch in range(self.state.epoch, spec.train.epochs):
            self.state.epoch = epoch
            t_epoch = time.perf_counter()
            self._set_learning_rates(epoch)
            self._train_epoch(epoch)
            with self.averaged():
                metrics = evaluate_split(self.dmp, spec, "valid", self.ctx)
            overall = selection_score(metrics, spec.train.select_metric)
            self.state.history.append({"epoch": epoch, "valid": metrics})
            self._log_eval(metrics, epoch)
            improved = overall > self.state.best_metric
            # the epoch is complete: the next resume starts the following epoch
            self.state.epoch, self.state.step_in_epoch = epoch + 1, 0
            if improved:
                self.state.best_metric, self.state.best_epoch = overall, epoch
                # relative to the run folder, so a copied or moved run folder names its own checkpoint
                self.state.best_checkpoint = checkpoint.best_relative(f"step_{self.state.global_step:09d}")
            path = self.save()
            if self.ctx.is_main:
                log.info("%s", epoch_line(epoch, spec.train.epochs, spec.train.select_metric, overall, improved,
                                          self.epoch_loss, self.epoch_rate, time.perf_counter() - t_epoch),
                         extra=CONSOLE)
                log.info("epoch %d checkpoint %s", epoch, path)
        # best_valid_metric is the valid value of select_metric (the mean of the domains' AUCs by default)
        summary = {"best_epoch": self.state.best_epoch, "best_valid_metric": json_safe(self.state.best_metric),
                   "select_metric": spec.train.select_metric,
                   "best_checkpoint": self.state.best_checkpoint, "history": json_safe(self.state.history)}
        if self.ctx.is_main:
            (self.out_dir / "train_summary.json").write_text(json.dumps(summary, indent=1, allow_nan=False))
            self.writer.flush()
        return summary

    def _set_learning_rates(self, epoch: int) -> None:
        """Fused embedding optimisers read param_groups' lr in step(), so one assignment reaches the kernels."""
        factor = self.spec.train.lr_decay ** epoch
        for group in self.dense_optimizer.param_groups:
            group["lr"] = self.spec.train.lr * factor
        tables = [*self.dmp.fused_optimizer.param_groups,
                  *(self.table_optimizer.param_groups if self.table_optimizer else [])]
        for group in tables:
            group["lr"] = self.spec.train.embedding_lr * factor

    def _steps_in_epoch(self, loader) -> int:
        """Training steps of one epoch over `loader`: its batches, capped by `train.max_steps`."""
        return min(len(loader), self.spec.train.max_steps or len(loader))

    def _train_epoch(self, epoch: int) -> None:
        spec, ctx = self.spec, self.ctx
        loader = self._loader("train", epoch)
        total = self._steps_in_epoch(loader)
        skip = self.state.step_in_epoch
        # exact resume: the order is a pure function of (seed, epoch), so the position is a batch count
        loader.load_state_dict(dict(loader.state_dict(), epoch=epoch, batches_yielded=skip))
        it = _take(iter(loader), total - skip)
        self.dmp.train()
        # The step runs a guard that refuses non-finite dense gradients (the sparse step runs in backward).
        guard = self.finite_grad_guard()
        train_step = make_train_step(self.dmp, guard, ctx.device, ctx.world_size)
        bar = None
        if ctx.is_main:
            from tqdm import tqdm

            bar = tqdm(total=total, initial=skip, desc=f"epoch {epoch + 1}/{spec.train.epochs}", unit="batch",
                       dynamic_ncols=True, mininterval=2.0, leave=False)
        t0, seen = time.perf_counter(), 0
        loss_sum, steps = None, 0  # summed on the loss's device: no per-step host sync
        every = spec.train.log_every_steps
        ckpt_every = spec.train.checkpoint_every_steps
        crash_at = _test_crash_step()
        recent: List[Any] = [None, None]  # the batches of the previous and the current step (deferred errors)
        while True:
            recent = [recent[1], train_step.batches[0] if train_step.batches else None]
            try:
                loss, logits, labels, domain, reg = train_step.progress(it)
            except StopIteration:
                break
            except NumericsError as e:  # from the guard: the step counters still name the previous step
                self._raise_numerics(e, epoch, recent)
            self.state.step_in_epoch += 1
            self.state.global_step += 1
            if self.average is not None:
                self.average.update(self.state.global_step - 1)
            if crash_at is not None and self.state.global_step == crash_at:
                log.error("RECSYS_TEST_CRASH_AT_STEP=%d: exiting hard (testing hook)", crash_at)
                os._exit(1)
            seen += int(labels.shape[0])
            if self.live is not None:
                self.live.update(logits, labels, domain)
            loss_sum = loss.detach().double() if loss_sum is None else loss_sum + loss.detach()
            steps += 1
            # deferred guard (CUDA): the loss is read on the host only where logging reads it anyway
            if (not guard.defer or self.state.global_step % every == 0) and not torch.isfinite(loss):
                raise NumericsError(_nan_report(self.state, logits, labels, domain, spec))
            if bar is not None:
                bar.update(1)
            if self.state.global_step % every == 0:
                if self.live is not None:  # collective: every rank computes at the same step
                    self._log_live(self.live.compute())
                rate = seen * ctx.world_size / max(time.perf_counter() - t0, 1e-9)
                self._log_step(float(loss), float(reg), domain, rate, logits, labels)
                if bar is not None:
                    bar.set_postfix(loss=f"{float(loss):.4f}", samples_s=f"{rate:,.0f}")
            if ckpt_every and self.state.global_step % ckpt_every == 0:
                self._flush_guard(guard, epoch, recent)  # never checkpoint right after a skipped bad step
                self.save()
        self._flush_guard(guard, epoch, recent)
        train_step.detach()  # restore the modules' own forwards so evaluation can call the model directly
        if bar is not None:
            bar.close()
        self.epoch_rate = seen * ctx.world_size / max(time.perf_counter() - t0, 1e-9)
        self.epoch_loss = float(loss_sum) / steps if steps else None  # this rank's mean batch loss
        if self.writer is not None:
            self.writer.add_scalar("train/samples_per_s_epoch", self.epoch_rate, self.state.global_step)

    def _flush_guard(self, guard: FiniteGradGuard, epoch: int, recent: List[Any]) -> None:
        try:
            guard.flush()
        except NumericsError as e:  # about the step just counted: steps_ago=1 against the next one
            self._raise_numerics(e, epoch, [recent[1], None])

    def _raise_numerics(self, e: NumericsError, epoch: int, recent: List[Any]) -> None:
        """Re-raise the guard's error naming the step and the batch it belongs to (a deferred one is a step late)."""
        ago = getattr(e, "steps_ago", 0)
        batch = recent[1 - ago] if ago <= 1 else None
        raise NumericsError(
            f"{e} at epoch {epoch} step {self.state.step_in_epoch + 1 - ago} (global "
            f"{self.state.global_step + 1 - ago}, rank {self.ctx.rank}); "
            f"{describe_batch(batch, [d.name for d in self.spec.domains])}. The dense step was refused and the "
            f"last good checkpoint in {self.ckpt_root} is kept intact; lower train.lr / "
            f"train.embedding_lr or check the data.") from None

    # -------------------------------------------------------------------------------------------------- logging
    def _log_step(self, loss: float, reg: float, domain: torch.Tensor, rate: float, logits: torch.Tensor,
                  labels: torch.Tensor) -> None:
        if self.writer is None:
            return
        step = self.state.global_step
        self.writer.add_scalar("train/loss", loss, step)
        bce = nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="none")
        for di, d in enumerate(self.spec.domains):  # this batch's unweighted BCE per domain (rank 0's share)
            mask = domain == di
            if mask.any():
                self.writer.add_scalar(f"train_loss/{d.name}", float(bce[mask].mean()), step)
        self.writer.add_scalar("train/regularizer", reg, step)
        self.writer.add_scalar("train/samples_per_s", rate, step)
        names = [d.name for d in self.spec.domains]
        gates = self.model.l1.gate_weights_by_domain(domain, len(names))
        for side, w in gates.items():
            aspects = self.model.l1.aspect_names[side]
            for di, dname in enumerate(names):
                if torch.isfinite(w[di]).all():
                    for ai, a in enumerate(aspects):
                        self.writer.add_scalar(f"gates/{dname}/{side}_{a}", float(w[di, ai]), step)

    def _log_live(self, values: Dict[str, float]) -> None:
        if self.writer is None:
            return
        for name, v in values.items():  # <domain>/auc, <domain>/ne over the last live_metrics_window samples
            self.writer.add_scalar(f"train_window/{name}", v, self.state.global_step)

    def _log_eval(self, metrics: Dict[str, Any], epoch: int) -> None:
        if self.writer is None:
            return
        self.writer.add_scalar("valid/overall_auc", metrics["overall"]["auc"], epoch)
        for d, m in metrics["domains"].items():
            for k in ("auc", "gauc", "logloss", "cold_auc"):
                if k in m and m[k] == m[k]:
                    self.writer.add_scalar(f"valid/{d}/{k}", m[k], epoch)


def _rng_state() -> Dict[str, Any]:
    st = np.random.get_state()
    return {"torch": torch.get_rng_state().tolist(), "numpy": [st[0], st[1].tolist(), int(st[2]), int(st[3]),
                                                                float(st[4])],
            "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]]}


def _set_rng_state(st: Dict[str, Any]) -> None:
    torch.set_rng_state(torch.tensor(st["torch"], dtype=torch.uint8))
    n = st["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    p = st["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))


def _test_crash_step() -> Optional[int]:
    """Testing hook: RECSYS_TEST_CRASH_AT_STEP=N makes every rank exit hard (os._exit(1), no cleanup, like a
    kill) right after global step N -- only on the first attempt (TORCHELASTIC_RESTART_COUNT unset or 0), so a
    `torchrun --max-restarts` restart resumes and finishes. Used by tests/reliability; unset in real runs."""
    raw = os.environ.get("RECSYS_TEST_CRASH_AT_STEP", "").strip()
    if not raw or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0:
        return None
    return int(raw)


def selection_score(metrics: Dict[str, Any], how: str) -> float:
    if how == "overall_auc":
        return metrics["overall"]["auc"]
    aucs = [m["auc"] for m in metrics["domains"].values() if m["auc"] == m["auc"]]
    return float(np.mean(aucs)) if aucs else float("nan")


def _take(it: Iterable, n: int):
    for i, x in enumerate(it):
        if i >= n:
            return
        yield x


def _nan_report(state: RunState, logits, labels, domain, spec: Spec) -> str:
    bad = ~torch.isfinite(logits)
    names = [d.name for d in spec.domains]
    doms = sorted({names[i] for i in domain[bad].tolist()}) if bad.any() else "all (loss or regulariser)"
    return (f"non-finite loss at epoch {state.epoch} step {state.step_in_epoch} (global {state.global_step}); "
            f"domains {doms}; {int(bad.sum())} of {len(logits)} logits non-finite. The last good checkpoint is "
            f"kept intact; lower train.lr / train.embedding_lr or check the data.")


def load_for_inference(spec: Spec, ctx: DistContext, path: Path):
    """A sharded model holding a checkpoint's weights (the run's best one when given a run folder)."""
    chosen = checkpoint.best_or_latest(Path(path))
    check_checkpoint_schema(schema_for(spec), checkpoint.verify(chosen).get("schema_sha256"), str(chosen))
    trainer = Trainer(spec, ctx, for_training=False)
    checkpoint.load(chosen, trainer.dmp)
    trainer.dmp.eval()
    return trainer.dmp, chosen
