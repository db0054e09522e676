"""torchrun scale-out: the process group, rank 0's choices and write faults shared with the other
ranks, sums over ranks, a check that every rank holds the same weights, stop signals all ranks
obey, and the failed collective that means another rank ended."""

from __future__ import annotations

import atexit
import gc
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn

from fastcifar.config import TrainConfig
from fastcifar.errors import FastCifarError, MachineFault

T = TypeVar("T")


@dataclass(frozen=True)
class Distributed:
    """This process's rank and the number of processes (1: not under torchrun)."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(config: TrainConfig, device: torch.device) -> Distributed:
    if not config.loader.distributed:
        return Distributed()
    import torch.distributed as dist

    if device.type == "mps":  # gloo has no MPS tensors: DDP's first broadcast failed
        raise FastCifarError("torchrun on Apple's MPS is not supported: run one process, or "
                             "give --device cpu")
    if device.type == "cuda":  # NCCL's object broadcasts use the current device: this rank's
        torch.cuda.set_device(device)
    if not dist.is_initialized():  # torchrun provides the rendezvous through env://
        start_process_group("nccl" if device.type == "cuda" else "gloo")
    return Distributed(dist.get_rank(), dist.get_world_size())


def start_process_group(backend: str, **options: object) -> None:
    """`torch.distributed.init_process_group`; a gloo group is also ended at this process's exit.

    A gloo rank that reached interpreter exit while a worker thread of the group still held a
    collective's tensor aborted (SIGABRT, "terminate called without an active exception"): the
    worker needs the GIL to let the tensor go. 7 of 47 two-rank CPU runs of the tests ended so
    after they had finished, 0 of 47 with the group ended first
    (cpu/gloo-exit-abort-20261130.md). Other backends keep torch's own teardown: NCCL's
    graceful end can wait on the other ranks where one rank failed alone."""
    import torch.distributed as dist

    # Its functions take `group=group.WORLD` as a default. Imported after the group exists (by
    # torch's compiler, when the first optimiser is built), that default holds the group past
    # destroy_process_group, and with it the threads, to the interpreter's exit.
    import torch.distributed.nn.functional  # noqa: F401

    dist.init_process_group(backend, **options)
    if backend == "gloo":
        atexit.register(end_process_group)


def end_process_group() -> None:
    """Destroy this process's group, if it has one, once nothing holds it: the group's end
    then waits, with the GIL released, for its worker threads to finish and joins them. A
    group still held (by an uncaught exception's traceback, say) lives on to the exit."""
    import torch.distributed as dist

    if dist.is_initialized():
        gc.collect()  # DDP's reference cycles hold the group until a collection
        dist.destroy_process_group()


# What a collective says when another rank's process ended: gloo's TCP transport (its messages
# carry "gloo/transport") when the peer's socket closed, and NCCL's ncclRemoteError. NCCL's own
# errors ("invalid usage"), a store's timeout (a peer stuck, not gone) and a loader's broken
# pipe are not in it: those stay tracebacks.
GLOO_PEER_LOST = ("connection closed by peer", "connection reset by peer")
NCCL_PEER_LOST = ("remote process exiting prematurely", "remote error detected from rank")


def lost_rank_cause(error: BaseException, distributed: Distributed) -> str | None:
    """What a failed collective said when another rank of the job is gone ("gloo: connection
    closed by peer"), or None: for a one-process run and any other error (a bug keeps its
    traceback)."""
    if distributed.world_size == 1 or not isinstance(error, RuntimeError):
        return None
    text = str(error).lower()
    if "gloo/transport" in text:
        return next((f"gloo: {lost}" for lost in GLOO_PEER_LOST if lost in text), None)
    return next((f"NCCL: {lost}" for lost in NCCL_PEER_LOST if lost in text), None)


def ranks_agree(model: nn.Module, distributed: Distributed) -> bool:
    """Whether every rank holds the same weights (a float64 fingerprint, all-gathered)."""
    if distributed.world_size == 1:
        return True
    import torch.distributed as dist

    parameters = torch.cat([p.detach().double().flatten() for p in model.parameters()])
    weights = torch.arange(1, len(parameters) + 1, dtype=torch.float64, device=parameters.device)
    fingerprint = torch.stack([parameters.sum(), (parameters * weights).sum()])
    gathered = [torch.zeros_like(fingerprint) for _ in range(distributed.world_size)]
    dist.all_gather(gathered, fingerprint)
    return all(torch.allclose(g, gathered[0], rtol=1e-9, atol=0) for g in gathered)


def share_run_dir(run_dir: Path, distributed: Distributed) -> Path:
    """Rank 0 names the run folder; the other ranks learn it."""
    return Path(broadcast_from_main(str(run_dir), distributed))


def broadcast_from_main(value: T, distributed: Distributed) -> T:
    """Rank 0's `value` on every rank (pickled by torch.distributed between our own processes)."""
    if distributed.world_size == 1:
        return value
    import torch.distributed as dist

    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def main_writes_agreed(write: Callable[[], None], distributed: Distributed) -> None:
    """Rank 0 runs `write` (the files only it writes); if that fails, every rank stops here with
    it. Alone, rank 0 would exit while the others waited at their next collective until torchrun
    tore the job down. One pickled broadcast: call it once an epoch, not each step."""
    if distributed.world_size == 1:
        write()
        return
    error = None
    if distributed.is_main:
        try:
            write()
        except Exception as caught:  # a full disk's MachineFault, or anything else
            error = caught
    failure = broadcast_from_main(None if error is None else str(error), distributed)
    if error is not None:
        raise error
    if failure is not None:
        raise MachineFault(f"rank 0 stopped: {failure}")


def all_reduce_sum(values: torch.Tensor, distributed: Distributed) -> torch.Tensor:
    if distributed.world_size > 1:
        import torch.distributed as dist

        dist.all_reduce(values)
    return values


def finite_on_every_rank(value: torch.Tensor, distributed: Distributed) -> bool:
    """Whether the device scalar `value` is finite on every rank: one host sync, and under
    torchrun one all-reduce beside it, so all ranks get the same answer at the same step."""
    non_finite = (~torch.isfinite(value)).float().reshape(1)
    return all_reduce_sum(non_finite, distributed).item() == 0


def all_reduce_max(value: int, distributed: Distributed, device: torch.device) -> int:
    """The largest of every rank's `value` (a host sync: call it every few steps, not each)."""
    if distributed.world_size == 1:
        return value
    import torch.distributed as dist

    holder = torch.tensor([value], device=device, dtype=torch.long)
    dist.all_reduce(holder, op=dist.ReduceOp.MAX)
    return int(holder.item())


class StopRequest:
    """SIGINT/SIGTERM set a flag checked at step boundaries; a second SIGINT exits at once."""

    def __init__(self) -> None:
        self.signal_number: int | None = None

    def handle(self, signal_number: int, frame) -> None:
        if self.signal_number is not None:
            raise KeyboardInterrupt  # second signal: stop now; checkpoints are atomic
        self.signal_number = signal_number


@contextmanager
def stop_on_signals(enabled: bool) -> Iterator[StopRequest]:
    request = StopRequest()
    if not enabled:
        yield request
        return
    previous = {number: signal.signal(number, request.handle)
                for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield request
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def stop_agreed(stop: StopRequest, steps: int, distributed: Distributed,
                device: torch.device, every: int) -> bool:
    """Whether to stop after this step: on a signal to this process or, under torchrun, to any
    rank; ranks compare every `every` steps (one all-reduce), so they stop at the same step."""
    if distributed.world_size == 1:
        return stop.signal_number is not None
    if steps % every:
        return False
    agreed = all_reduce_max(stop.signal_number or 0, distributed, device)
    if agreed and stop.signal_number is None:
        stop.signal_number = agreed  # another rank's signal stops this one too
    return bool(agreed)
