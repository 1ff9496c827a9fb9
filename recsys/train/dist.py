"""Process-group setup: the same code runs under `torchrun --nproc_per_node=N` and as a plain single process."""
from __future__ import annotations

import logging
import os
import socket
import sys
from dataclasses import dataclass
from typing import NoReturn, Optional

import torch
import torch.distributed as dist

from recsys import startup_errors

log = logging.getLogger("recsys.train.dist")

@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


# What stderr shows when the race exit_process avoids kills a process (the benchmarks and tests retry once on it).
GLOO_EXIT_ABORT = "terminate called without an active exception"

# Set once this process has run a gloo process group (see exit_process).
_GLOO_USED = False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(device: str = "auto") -> DistContext:
    """NCCL on CUDA, gloo on CPU. Without torchrun's environment a one-rank group on localhost is created, since
    DistributedModelParallel always needs a process group."""
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if "RANK" not in os.environ:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
        backend = "nccl"
    else:
        dev = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        # past start-up without an error: a quiet rank that failed there prints its own line (recsys.startup_errors)
        startup_errors.publish_outcome("")
        global _GLOO_USED
        _GLOO_USED = _GLOO_USED or backend == "gloo"
        if "TORCHELASTIC_RESTART_COUNT" in os.environ:
            _init_attempt_scoped(backend, rank, world)
        else:
            dist.init_process_group(backend=backend, rank=rank, world_size=world)
    if not use_cuda:
        set_cpu_threads(int(os.environ.get("LOCAL_WORLD_SIZE", world)), announce=rank == 0)
    return DistContext(rank, world, local_rank, dev, backend)


# On CPU, ranks on one host split the same cores: each gets a share of the batch (smaller GEMMs), and every step
# adds gloo collectives (the dense all-reduce, the embeddings' all-to-all) that threads in one process do not
# need. What ranks buy is parallel Python and dispatch, which only pays once a rank has enough cores that intra-op
# threads stop scaling on small ops. Measured on 2-core AVX2 and AVX512 machines (benchmarks/results/throughput.md):
# one process beat 2 ranks by 8-28% for the peers' configuration and lost by ~5% for the full model, so one rank
# per CORES_PER_CPU_RANK cores is the advice (a heuristic: many-core hosts were not measured); the job logs it.
CORES_PER_CPU_RANK = 8


def recommended_cpu_ranks(cores: int) -> int:
    """Ranks per host the logs advise on a CPU host with `cores` usable cores."""
    return max(1, cores // CORES_PER_CPU_RANK)


def recommended_ranks() -> int:
    """Ranks per host for this machine: one per GPU, else recommended_cpu_ranks (scripts/quickstart.sh uses it)."""
    if torch.cuda.is_available():
        return torch.cuda.device_count()
    from recsys import hardware

    return recommended_cpu_ranks(hardware.cpu_info().cores)


def set_cpu_threads(local_ranks: int, announce: bool = True) -> int:
    """Intra-op threads per rank = usable cores (affinity/cgroup-aware, not os.cpu_count) // ranks on this host:
    more threads than cores per rank only adds contention. Logs the choice and the ranks advice."""
    from recsys import hardware

    cores = hardware.cpu_info().cores
    threads = max(1, cores // max(1, local_ranks))
    torch.set_num_threads(threads)
    if announce:
        advice = recommended_cpu_ranks(cores)
        log.info("CPU: %d rank(s) on this host, %d usable cores -> %d intra-op threads per rank (%s)", local_ranks,
                 cores, threads, hardware.describe())
        if local_ranks > advice:
            log.warning("%d ranks on %d cores: one process per %d cores is advised on CPU (here %d: run `python "
                        "jobs/...` without torchrun, or --nproc_per_node=%d); ranks add gloo collectives and split "
                        "the batch, see docs/cpu_speed.md", local_ranks, cores, CORES_PER_CPU_RANK, advice, advice)
    return threads


def _init_attempt_scoped(backend: str, rank: int, world: int) -> None:
    """Under torchelastic, create the default process group on a store prefixed by the restart attempt.

    torchrun keeps one rendezvous store for all attempts of a job, and the process group's keys (the gloo/NCCL
    peer addresses) are not scoped by attempt: after a `--max-restarts` restart a rank can read its peer's address
    from the dead attempt and fail with "connectFullMesh ... Connection refused" (seen here with gloo; upstream
    pytorch/pytorch#167288 reports it for NCCL). A per-attempt prefix makes stale keys invisible."""
    # the agent hosts the store when TORCHELASTIC_USE_AGENT_STORE=True; otherwise rank 0 does (as env:// would)
    host = rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"
    base = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=host)
    store = dist.PrefixStore(f"recsys/attempt_{os.environ['TORCHELASTIC_RESTART_COUNT']}", base)
    dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def exit_process(code: Optional[int] = 0) -> NoReturn:
    """Exit with `code`; after a gloo process group, without interpreter finalisation.

    Why: gloo's worker threads drop a finished collective's Work object on their own, a moment after the caller's
    wait() returned. When the collective's tensors belong to Python (all_gather_object, DDP buckets), that drop
    needs the GIL; if the main thread is already finalising the interpreter, CPython 3.11 ends the asking thread
    with pthread_exit, whose unwinding through a noexcept C++ frame calls std::terminate: SIGABRT and "terminate
    called without an active exception" after the job's work was done (a core dump shows
    AsyncAllgatherWork::~AsyncAllgatherWork in ProcessGroupGloo::runLoop while the main thread is in
    Py_FinalizeEx). destroy_process_group() does not prevent it: TorchRec's modules still hold the group, so its
    threads outlive it. Every output is written and closed before this is called, so the process flushes its
    streams and log handlers and leaves with os._exit, skipping the finalisation the race needs."""
    code = int(code or 0)
    if not _GLOO_USED:
        sys.exit(code)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)
