"""Where training runs: the device, the torchrun process group, and the collectives that make many processes act as one."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA, then MPS, then the CPU; any other name is taken as it is and must be available."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} was asked for, but CUDA is not available on this machine")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise RuntimeError(f"device {name!r} was asked for, but MPS is not available on this machine")
    return device


@contextlib.contextmanager
def process_group() -> Iterator[tuple[int, int]]:
    """Join the processes torchrun started and yield (rank, world size); without torchrun yield (0, 1), no group.

    torchrun describes the group in WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR and MASTER_PORT. With CUDA the backend
    is NCCL and process LOCAL_RANK uses GPU LOCAL_RANK; without, it is Gloo on the CPU. The group ends with the block.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        yield 0, 1
        return
    if torch.cuda.is_available():
        local_rank = int(os.environ["LOCAL_RANK"])
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
    else:
        dist.init_process_group("gloo")
    try:
        yield dist.get_rank(), world_size
    finally:
        dist.destroy_process_group()


def rank_and_world_size() -> tuple[int, int]:
    """This process's rank and the number of processes training together: (0, 1) without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def check_backend(device: torch.device) -> None:
    """Refuse a device that the process group's backend cannot train on (NCCL needs CUDA, Gloo the CPU)."""
    if rank_and_world_size()[1] == 1:
        return
    backend = dist.get_backend()
    expected = "cuda" if backend == "nccl" else "cpu"
    if device.type != expected:
        raise ValueError(f"device {str(device)!r} cannot train in a {backend} process group: use {expected}")


def sum_over_processes(values: Tensor) -> Tensor:
    """``values``, summed in place over the processes training together (as they are in a single process)."""
    if rank_and_world_size()[1] > 1:
        dist.all_reduce(values)
    return values


def from_rank_0(value: Any) -> Any:
    """``value`` as rank 0 has it, on every process (as it is in a single process)."""
    if rank_and_world_size()[1] == 1:
        return value
    shared = [value]
    dist.broadcast_object_list(shared, src=0)
    return shared[0]
