"""Data-parallel training with PyTorch's own engines: ``torchrun`` + DDP or FSDP2, DCP checkpoints.

    torchrun --nproc_per_node N -m fourbit.cli train --recipe nvfp4 --parallel fsdp2 ...

* Process group: NCCL on GPUs (one per rank, ``cuda:LOCAL_RANK``), gloo on CPU; from torchrun's env vars.
* Data: the global batch (``--batch-size``) is split evenly; rank ``r`` takes rows ``r*B/N ..`` of the
  same global batch a single process would draw (``BatchSampler(rank, world_size)``).
* DDP wraps the model; gradients are averaged over ranks.
* FSDP2 (``fully_shard`` on each block, then the root): parameters, gradients and optimizer state are
  sharded over ranks and all-gathered **in high precision** just before each block runs; quantized layers
  then quantize the gathered weight, exactly as on one GPU. The trade-off: the all-gather moves BF16/FP32
  weights, not FP4/FP8 ones (all-gathering pre-quantized weights would cut that traffic ~4x but make
  the quantized weight depend on the sharding; not done here).
* Quantized layers (``fourbit.nn.set_data_parallel``) all-reduce each per-tensor amax and index stochastic
  rounding by position in the global batch, so an N-rank run quantizes exactly as a 1-rank run with the
  same global batch, and losses agree up to float32 summation order.
* Checkpoints: ``torch.distributed.checkpoint`` (DCP) writes a sharded directory ``ckpt_dcp/`` plus the
  loop's own small state; DCP reshards on load, so a run saved on N ranks resumes on M (also on one
  process without a process group).
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["Parallel", "DistEnv", "init", "wrap", "finish", "all_mean", "any_flag", "save_sharded", "load_sharded",
           "SHARDED_CHECKPOINT"]  # fmt: skip

SHARDED_CHECKPOINT = "ckpt_dcp"
_LOOP_STATE = "loop_state.pt"


class Parallel(enum.Enum):
    NONE = "none"
    DDP = "ddp"
    FSDP2 = "fsdp2"


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job (rank 0 of 1 without torchrun)."""

    mode: Parallel = Parallel.NONE
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.mode is not Parallel.NONE

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def parse(mode: str | Parallel) -> Parallel:
    if isinstance(mode, Parallel):
        return mode
    try:
        return Parallel(mode)
    except ValueError:
        raise ValueError(f"unknown --parallel {mode!r}; choose from {', '.join(p.value for p in Parallel)}") from None


def init(mode: str | Parallel, device: torch.device) -> tuple[DistEnv, torch.device]:
    """Join the torchrun job (``mode`` ddp/fsdp2) and pick this rank's device; a no-op for ``none``."""
    mode = parse(mode)
    if mode is Parallel.NONE:
        return DistEnv(), device
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise ValueError(
            f"--parallel {mode.value} runs under torchrun, e.g. "
            f"`torchrun --nproc_per_node 2 -m fourbit.cli train --parallel {mode.value} ...`"
        )
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None)
    return DistEnv(mode, rank, world, local), device


def wrap(model: nn.Module, env: DistEnv, device: torch.device) -> nn.Module:
    """DDP- or FSDP2-wrap ``model`` (in place for FSDP2); quantized layers join the data-parallel group."""
    if not env.distributed:
        return model
    from .. import nn as fnn

    fnn.set_data_parallel(model)
    if env.mode is Parallel.DDP:
        # broadcast_buffers=False: the model's buffers are constants (RoPE tables) and the QuantLinear step
        # counters, which every rank advances alike; broadcasting them would add a collective per forward
        return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                                   broadcast_buffers=False)  # fmt: skip
    from torch.distributed.fsdp import fully_shard

    for block in getattr(model, "blocks", []):
        fully_shard(block)
    fully_shard(model)
    return model


def finish() -> bool:
    """Leave the torchrun job (destroy the process group) if in one; True on rank 0 or without one,
    i.e. where the command should print its result."""
    if not (dist.is_available() and dist.is_initialized()):
        return True
    rank = dist.get_rank()
    dist.barrier()  # no rank tears the group down while another still uses it (gloo aborts at exit otherwise)
    dist.destroy_process_group()
    return rank == 0


def all_mean(t: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Mean of a tensor over ranks (equal-sized shards: the global mean)."""
    if not env.distributed:
        return t
    t = t.clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t / env.world_size


def any_flag(flag: bool, env: DistEnv, device: torch.device) -> bool:
    """True on every rank if any rank's flag is set (a Ctrl-C seen by one rank stops all at the same step)."""
    if not env.distributed:
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def save_sharded(out: Path, model: nn.Module, opt: torch.optim.Optimizer, loop_state: dict, env: DistEnv) -> None:
    """Model and optimizer through DCP into ``out/ckpt_dcp`` (every rank writes its shard), loop state by rank 0."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    path = Path(out) / SHARDED_CHECKPOINT
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path))
    if env.is_main:
        tmp = path / (_LOOP_STATE + ".tmp")
        torch.save(loop_state, tmp)
        os.replace(tmp, path / _LOOP_STATE)
    if env.distributed:
        dist.barrier()


def sharded_step(out: Path) -> int | None:
    """The step of the sharded checkpoint in ``out``, or None."""
    p = Path(out) / SHARDED_CHECKPOINT / _LOOP_STATE
    return int(torch.load(p, weights_only=True)["step"]) if p.exists() else None


def load_sharded(out: Path, model: nn.Module, opt: torch.optim.Optimizer) -> dict:
    """Load ``out/ckpt_dcp`` into this (possibly differently sharded) model and optimizer; returns the loop state."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    path = Path(out) / SHARDED_CHECKPOINT
    model_sd, optim_sd = get_state_dict(model, opt)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return torch.load(path / _LOOP_STATE, map_location="cpu", weights_only=True)  # RNG states stay on the CPU
