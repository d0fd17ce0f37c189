"""Single process or torchrun (DDP), with the same code path; gloo on CPU, NCCL on CUDA."""

from __future__ import annotations

import gc
import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ctfgen.errors import CtfgenError


@dataclass
class Runtime:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CtfgenError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda") or (device.type == "cuda" and not torch.cuda.is_available()):
        raise CtfgenError(f"--device {name}: not available on this machine; use auto or cpu")
    return device


def init_runtime(device: str = "auto") -> Runtime:
    """Join the torchrun process group when launched by torchrun, else run alone."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    dev = pick_device(device)
    if world_size == 1:
        return Runtime(device=dev)
    if dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Runtime(rank=dist.get_rank(), world_size=dist.get_world_size(), device=dev)


def all_reduce_sum(tensor: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    if runtime.distributed:
        dist.all_reduce(tensor)
    return tensor


def broadcast(tensor: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    if runtime.distributed:
        dist.broadcast(tensor, src=0)
    return tensor


def all_gather_object(obj, runtime: Runtime) -> list:
    """`obj` of every rank, in rank order ([obj] in a single process). Any picklable object."""
    if not runtime.distributed:
        return [obj]
    gathered = [None] * runtime.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def any_rank(flag: bool, runtime: Runtime) -> bool:
    """Whether `flag` is set on any rank; every rank must ask."""
    if not runtime.distributed:
        return flag
    return bool(all_reduce_sum(torch.tensor(float(flag), device=runtime.device), runtime) > 0)


def barrier(runtime: Runtime) -> None:
    if runtime.distributed:
        dist.barrier()


def round_robin_batches(count: int, batch_size: int, runtime: Runtime) -> list[range | None]:
    """This process's share of the `batch_size` batches of items 0..count-1: batches rank, rank + W, rank + 2W, ...
    of a single process's order, whole, so that each batch holds the same items in the same shape as there (and
    is computed bit for bit alike). One entry per round of `gather_in_order`, None where this process has no
    batch left in the last round."""
    starts = range(0, count, batch_size)
    rounds = -(-len(starts) // runtime.world_size)
    batches = (round_ * runtime.world_size + runtime.rank for round_ in range(rounds))
    return [range(starts[b], min(starts[b] + batch_size, count)) if b < len(starts) else None for b in batches]


def gather_in_order(part, runtime: Runtime) -> list:
    """One round of `round_robin_batches`: on rank 0, every process's `part` (its batch's results, or None) in rank
    order, which is a single process's batch order; [] on the others. Any picklable object; small per round."""
    if not runtime.distributed:
        return [] if part is None else [part]
    parts = [None] * runtime.world_size if runtime.is_main else None
    dist.gather_object(part, parts, dst=0)
    return [p for p in parts if p is not None] if runtime.is_main else []


def shutdown(runtime: Runtime, clean: bool = True) -> None:
    """Leave the process group. After a clean run every rank first waits for the others, so none tears its
    connections down while a peer still uses them (not after an error: the others may never arrive). FSDP's
    modules and device mesh form reference cycles that hold the group; collected here, while the interpreter is
    whole, rather than at exit, where gloo's worker threads may be destroyed mid-work (an abort)."""
    if not (runtime.distributed and dist.is_initialized()):
        return
    if clean:
        dist.barrier()
    gc.collect()
    dist.destroy_process_group()


@contextmanager
def launched(device: str = "auto"):
    """`with launched(device) as runtime:` joins torchrun's group (if any) and always leaves it."""
    runtime = init_runtime(device)
    try:
        yield runtime
    except BaseException:
        shutdown(runtime, clean=False)
        raise
    shutdown(runtime)


def run_launched(run_in, cfg):
    """`run_in(cfg, runtime)` alone or as one of torchrun's processes: its result on the main process, None on the
    others (so that one process reports)."""
    with launched(cfg.device) as runtime:
        result = run_in(cfg, runtime)
    return result if runtime.is_main else None
