"""Where training runs: the device, the process group (vae.launch's or torchrun's), and the collectives that make many
processes act as one."""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist

# Imported before any group is joined: this module takes the group of the moment as the default of its functions'
# group argument when it is first imported (torch 2.13; torch._dynamo imports it, and the first optimizer step imports
# torch._dynamo), and so would keep the group, and its Gloo threads, alive past destroy_process_group until interpreter
# exit, where their teardown now and then aborted a process that had finished its work (SIGABRT).
import torch.distributed.nn.functional
from torch import Tensor

from vae import launch


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
    """Join the processes :func:`vae.launch.launch` or torchrun started and yield (rank, world size); in a process on
    its own yield (0, 1), no group.

    Both describe the group in WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR and MASTER_PORT. Under vae.launch, rank 0
    serves the group's store on the loopback socket it was handed and the others connect to it there. Under torchrun
    the store is torchrun's, and rank 0 warns when it listens on every interface. With CUDA the backend is NCCL and
    process LOCAL_RANK uses GPU LOCAL_RANK; without, it is Gloo on the CPU. The group ends with the block.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        yield 0, 1
        return
    rank = int(os.environ["RANK"])
    group: dict[str, Any] = {}  # torchrun's rendezvous (env://), unless vae.launch started the group
    if (store := launch.loopback_store(rank, world_size)) is not None:
        group = {"store": store, "rank": rank, "world_size": world_size}
    elif rank == 0 and (warning := launch.exposed_store_warning()):
        warnings.warn(warning, stacklevel=3)
    if torch.cuda.is_available():
        local_rank = int(os.environ["LOCAL_RANK"])
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank), **group)
    else:
        dist.init_process_group("gloo", **group)
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


def from_rank_0(values: Mapping[str, float] | None, names: Sequence[str], device: torch.device) -> dict[str, float]:
    """Rank 0's ``values`` (numbers under ``names``; the other processes pass None) on every process, as they are in
    a single process.

    They travel as one float64 tensor: exact for Python floats, and unlike an object broadcast nothing is unpickled
    from what the other end of the process group's sockets sent.
    """
    if rank_and_world_size()[1] == 1:
        return dict(values)
    shared = torch.zeros(len(names), dtype=torch.float64, device=device)
    if values is not None:  # rank 0
        shared.copy_(torch.tensor([values[name] for name in names], dtype=torch.float64))
    dist.broadcast(shared, src=0)
    return dict(zip(names, shared.tolist()))
