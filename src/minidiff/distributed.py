"""Data-parallel training and sharded sampling under ``torchrun`` (one process per device).

``torchrun --nproc_per_node=N -m minidiff train …`` sets RANK / WORLD_SIZE / LOCAL_RANK; then
every process builds the same model, reads the same global batch indices and keeps its own
``batch_size / N`` slice (the t and ε of the whole batch are drawn on every rank from the same
generator, so each rank's slice matches what a single process would draw for those images).
DistributedDataParallel averages the gradients: the update is the single-process update with
the same global batch, except that BatchNorm normalises with each rank's own slice statistics.
Only rank 0 writes files; shared caches (MNIST, the evaluation classifier) are filled by rank 0
while the others wait (``rank_zero_first``). NCCL on GPUs, gloo on CPUs. Without torchrun
nothing changes.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from .config import ConfigError


def _env_int(name: str, default: int | None, low: int, high: int | None = None) -> int:
    """An integer environment variable in [low, high]; ConfigError naming it otherwise."""
    text = os.environ.get(name)
    if text is None:
        if default is None:
            raise ConfigError(f"environment variable {name} is not set; torchrun sets RANK, WORLD_SIZE "
                              "and LOCAL_RANK for every process")
        return default
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < low or (high is not None and value > high):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ConfigError(f"environment variable {name} must be an integer {bound} (as torchrun sets it), "
                          f"got {text!r}")
    return value


def env_world_size() -> int:
    """WORLD_SIZE as torchrun sets it, 1 without torchrun; ConfigError if it is not an integer >= 1."""
    return _env_int("WORLD_SIZE", 1, 1)


def env_world() -> tuple[int, int, int]:
    """(RANK, WORLD_SIZE, LOCAL_RANK) as torchrun sets them, (0, 1, 0) without torchrun; a
    ConfigError names a variable that is not an integer in its range (RANK and LOCAL_RANK are
    read only when WORLD_SIZE is above 1)."""
    size = env_world_size()
    if size == 1:
        return 0, 1, 0
    return _env_int("RANK", None, 0, size - 1), size, _env_int("LOCAL_RANK", 0, 0)


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside torchrun."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_env() -> torch.device | None:
    """Join the process group torchrun describes; returns this rank's device, None without torchrun."""
    _, size, local = env_world()
    if size == 1:
        return None
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def is_main() -> bool:
    return world()[0] == 0


def barrier() -> None:
    if world()[1] > 1:
        dist.barrier()


def rank_zero_first(fn):
    """``fn()`` on rank 0, then — after a barrier — on every other rank; returns its result.

    For loaders that fill a shared cache on first use (MNIST, the evaluation classifier): rank 0
    fetches or trains and writes once, the others wait and then read what it wrote."""
    if is_main():
        out = fn()
    barrier()
    if not is_main():
        out = fn()
    return out


def shard(n: int) -> slice:
    """This rank's contiguous share of ``n`` items (the first ranks take one more when uneven)."""
    rank, size = world()
    base, extra = divmod(n, size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))


def mean_across(x: torch.Tensor) -> torch.Tensor:
    """The mean of a scalar over all ranks (itself outside torchrun)."""
    if world()[1] == 1:
        return x
    x = x.detach().clone()
    dist.all_reduce(x)
    return x / world()[1]


def gather_cat(x: torch.Tensor, n: int) -> torch.Tensor:
    """Concatenate every rank's ``shard(n)`` of a tensor along dim 0, in rank order."""
    rank, size = world()
    if size == 1:
        return x
    sizes = [n // size + (r < n % size) for r in range(size)]
    padded = torch.zeros((max(sizes), *x.shape[1:]), dtype=x.dtype, device=x.device)
    padded[:x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)])
