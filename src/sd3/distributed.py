"""Running under torchrun: joining the process group, and splitting a list of work among ranks.

torchrun (one node or several, through its rendezvous) starts the processes and sets RANK,
WORLD_SIZE and LOCAL_RANK; `join` reads them. Without torchrun every function here sees one
process of rank 0, so the same code runs alone.
"""

import datetime
import os
from collections.abc import Sequence
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def local_device(device: torch.device | None) -> torch.device:
    """This process's device: by default cuda:LOCAL_RANK where CUDA is present, else the CPU; a
    bare "cuda" under torchrun becomes cuda:LOCAL_RANK."""
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        return torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        return torch.device(f"cuda:{local}")
    return device


def join(device: torch.device | None, timeout_hours: float = 12) -> tuple[int, int, torch.device]:
    """Join the torchrun job if there is one: (rank, world size, `local_device(device)`). The
    backend is nccl on CUDA, gloo on the CPU. The long default timeout lets rank 0 do one-off
    work (encoding a dataset) while the others wait at a barrier."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = local_device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(hours=timeout_hours))
    return (dist.get_rank(), dist.get_world_size(), device) if world > 1 else (0, 1, device)


def rank_and_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def share(items: Sequence[T], rank: int, world: int) -> list[T]:
    """This rank's share of `items`: every world-th one from position `rank` (round robin, so
    ranks get equal counts within one, and neighbouring items, often alike in cost, spread out)."""
    return list(items[rank::world])


def agree(value: T) -> T:
    """Rank 0's `value` in every rank (e.g. the work still to do, as rank 0 sees it on disk)."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(value: T) -> list[T]:
    """Every rank's `value`, in rank order, in every rank."""
    if not dist.is_initialized():
        return [value]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def total(count: int, device: torch.device) -> int:
    """The sum of `count` over all ranks (on `device`: nccl reduces CUDA tensors only)."""
    if not dist.is_initialized():
        return count
    t = torch.tensor([count], dtype=torch.int64, device=device)
    dist.all_reduce(t)
    return int(t.item())


def leave() -> None:
    """Wait for every rank, then leave the process group (if one was joined)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
