"""Runs started by a multi-process launcher (``accelerate launch``, ``torchrun``): rank, world size, gather.

The launchers set ``RANK`` and ``WORLD_SIZE`` (and ``MASTER_ADDR``/``MASTER_PORT`` for the rendezvous);
the processes talk over torch.distributed's ``gloo`` backend, which works on CPU.
"""

from __future__ import annotations

import os
from typing import Any

import torch.distributed as dist

__all__ = ["gather_to_rank0", "launcher_rank"]


def launcher_rank() -> tuple[int, int]:
    """(rank, world size) from the launcher's environment; (0, 1) in a plain process."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
    except ValueError:
        raise ValueError(
            f"RANK={os.environ.get('RANK')!r} / WORLD_SIZE={os.environ.get('WORLD_SIZE')!r} are not integers. "
            "Fix: start the processes with `accelerate launch` or `torchrun`, or unset these variables"
        ) from None
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"RANK={rank} is outside WORLD_SIZE={world}. Fix: start the processes with a launcher")
    return rank, world


def gather_to_rank0(obj: Any) -> list[Any] | None:
    """Every rank's ``obj`` (picklable), in rank order, on rank 0; None on the other ranks.

    Initialises a ``gloo`` process group from the launcher's environment if none exists, and
    destroys it again when it created it.
    """
    rank, world = launcher_rank()
    if world == 1:
        return [obj]
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing and not dist.is_initialized():
        raise ValueError(
            f"WORLD_SIZE={world} but {', '.join(missing)} unset: the processes cannot meet. "
            "Fix: start them with `accelerate launch` or `torchrun`"
        )
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        out: list[Any] | None = [None] * world if rank == 0 else None
        dist.gather_object(obj, out, dst=0)
        return out
    finally:
        if created:
            dist.destroy_process_group()
