"""Rotation learning over several processes (one per GPU, launched by torchrun): each process holds the
whole frozen model, takes an equal share of every micro-batch, and the rotations' gradients are averaged
before the (identical) Cayley step, as DistributedDataParallel would do for R1 and the R2s. The weights'
rotation, the same work on every process, is split too: each process rotates and fake-quantizes its part
of each weight (RotatedLlama) and the parts are gathered.

Not FSDP: the rotations are the only trainable tensors and an 8B model's frozen bf16 weights (15 GiB) fit
each GPU with room to spare, so sharding them would only add an all-gather of every layer's weights to
each forward and each checkpointed replay.

    torchrun --nproc-per-node 2 -m spinquant.optimize ...
"""

import os

import torch
import torch.distributed as dist

from spinquant.errors import UserError


def launched_processes() -> int:
    """How many processes torchrun started (1 without torchrun), known before the process group is joined."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched() -> bool:
    """Whether torchrun started this process as one of several."""
    return launched_processes() > 1


def check_batch_splits(batch_size: int, processes: int) -> None:
    """A batch's windows go to the processes in equal shares."""
    if batch_size % processes:
        raise UserError(f"--batch-size {batch_size} does not split over {processes} processes: use a multiple of {processes}")


def start(device_type: str) -> torch.device:
    """Join torchrun's process group (NCCL on GPUs, gloo on CPUs); this process's device."""
    if device_type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise UserError(f"process {local} of torchrun has no GPU: {torch.cuda.device_count()} visible")
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return torch.device("cuda", torch.cuda.current_device()) if device_type == "cuda" else torch.device("cpu")


def stop() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def shard(t: torch.Tensor, dim: int | None) -> torch.Tensor:
    """This process's equal part of `t` along `dim` (all of it for dim None)."""
    return t if dim is None else t.chunk(world_size(), dim)[rank()]


def gather_shards(part: torch.Tensor, dim: int | None) -> torch.Tensor:
    """Every process's `part` joined along `dim`, differentiably: each process's gradient is its part of the
    gradients summed over the processes."""
    return part if dim is None else _GatherShards.apply(part, dim)


class _GatherShards(torch.autograd.Function):
    @staticmethod
    def forward(ctx, part: torch.Tensor, dim: int) -> torch.Tensor:
        ctx.dim = dim
        parts = [torch.empty_like(part) for _ in range(world_size())]
        dist.all_gather(parts, part.contiguous())
        return torch.cat(parts, dim)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        total = grad.contiguous().clone()  # all_reduce works in place
        dist.all_reduce(total)
        return total.chunk(world_size(), ctx.dim)[rank()], None


def local_share(ids: torch.Tensor) -> torch.Tensor:
    """This process's windows of a micro-batch: an equal, contiguous share."""
    check_batch_splits(len(ids), world_size())
    return shard(ids, 0)


def average_gradients(params: list[torch.Tensor]) -> None:
    """Every process's gradients replaced by their mean over the processes (one flat all-reduce)."""
    if world_size() == 1:
        return
    grads = [p.grad for p in params]
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    flat /= world_size()
    for g, part in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(part.view_as(g))


def mean(value: float, device: torch.device) -> float:
    """A float's mean over the processes (the step's loss, for the log)."""
    return _reduce(value, device, dist.ReduceOp.SUM) / world_size()


def maximum(value: float, device: torch.device) -> float:
    """A float's largest value over the processes (a benchmark's slowest time, its largest memory peak)."""
    return _reduce(value, device, dist.ReduceOp.MAX)


def _reduce(value: float, device: torch.device, op) -> float:
    if world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=op)
    return t.item()
