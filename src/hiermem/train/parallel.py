"""Running on several processes with PyTorch's own engine: torchrun starts them, torch.distributed connects them.

Parallelism is applied from outside the model (as torchtitan does): the anchor is wrapped here, in DDP
(replicated; the default) or FSDP2 (`fully_shard` per transformer block and the root; train.parallel=fsdp, for an
anchor too large to replicate), and the bank is sharded by subtree (data/sharding.py, memory/shard.py). One
process (no WORLD_SIZE, or 1) never creates a process group, so its path is the single-process code unchanged.

Gradients are summed, not averaged, over ranks (a DDP comm hook; FSDP2's average times the world size): each
rank's loss is already normalised by the global count of target tokens, so the sum is the gradient of the
global batch's mean loss, exactly as one process computes it over the union of the ranks' batches. CPU runs use
gloo, GPU runs NCCL; every collective waits at most train.dist_timeout_s, then the job stops with an error
instead of hanging.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from hiermem.errors import HiermemError


@dataclass
class World:
    """This process's place in the job. rank 0 alone writes the progress bar, metrics and run files."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str | None = None
    comm_bytes: dict[str, int] = field(default_factory=lambda: {"anchor": 0, "memory": 0})  # all-reduced so far

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, kind: torch.device) -> torch.device:
        """The device of this rank: cuda:<local rank> on GPUs."""
        return torch.device("cuda", self.local_rank) if kind.type == "cuda" and self.distributed else kind

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def sum_(self, t: torch.Tensor, group=None) -> torch.Tensor:
        """All-reduce (sum) in place over the job, or over `group`; a no-op on one process."""
        if self.distributed:
            dist.all_reduce(t, group=group)
        return t

    def sum_int(self, x: int, device: torch.device) -> int:
        """A host integer summed over ranks (read at logging steps only: it waits for the other ranks)."""
        if not self.distributed:
            return x
        return int(self.sum_(torch.tensor([x], dtype=torch.int64, device=device)).item())

    def gather(self, obj) -> list | None:
        """Every rank's obj on rank 0 (None elsewhere)."""
        if not self.distributed:
            return [obj]
        out = [None] * self.size if self.is_main else None
        dist.gather_object(obj, out, dst=0)
        return out


def init_world(device: torch.device, timeout_s: int) -> World:
    """The process group from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), or a
    one-process World. gloo on CPU, NCCL on CUDA."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    missing = [k for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise HiermemError(f"WORLD_SIZE={size} but {', '.join(missing)} unset: launch with torchrun")
    rank, local = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        try:
            dist.init_process_group(backend, rank=rank, world_size=size,
                                    timeout=datetime.timedelta(seconds=timeout_s))
        except Exception as e:  # a rendezvous that never completes
            raise HiermemError(f"rank {rank}: cannot join the job of {size} processes within {timeout_s} s "
                               f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    return World(rank, size, local, backend)


def close_world(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def collective_errors(world: World, timeout_s: int):
    """Turn a failed collective (a peer died, or train.dist_timeout_s passed) into a one-line HiermemError."""
    if not world.distributed:
        yield
        return
    try:
        yield
    except HiermemError:
        raise
    except (RuntimeError, dist.DistError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise HiermemError(f"rank {world.rank}: the job stopped: another process failed or did not answer "
                           f"within train.dist_timeout_s={timeout_s} s ({first})") from None


def _sum_hook(world: World):
    def hook(state, bucket):
        buf = bucket.buffer()
        world.comm_bytes["anchor"] += buf.numel() * buf.element_size()
        return dist.all_reduce(buf, async_op=True).get_future().then(lambda f: f.value()[0])

    return hook


def wrap_anchor(model: torch.nn.Module, world: World, parallel: str) -> torch.nn.Module:
    """The module the step calls: the model itself on one process (or when nothing in it learns), else DDP
    with summed gradients, or the model sharded in place by fully_shard."""
    if not world.distributed or not any(p.requires_grad for p in model.parameters()):
        return model
    if parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)  # its reduce-scatter averages (gloo has no pre-multiplied sum): step.py rescales
        return model
    from torch.nn.parallel import DistributedDataParallel

    ddp = DistributedDataParallel(model)
    ddp.register_comm_hook(None, _sum_hook(world))
    return ddp


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether fully_shard made this model's parameters DTensors."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def no_grad_sync(module: torch.nn.Module, last: bool):
    """Skip the gradient all-reduce for every micro-batch but the last."""
    if last or module is None:
        yield
    elif hasattr(module, "no_sync"):  # DDP
        with module.no_sync():
            yield
    elif hasattr(module, "set_requires_gradient_sync"):  # FSDP2
        module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            module.set_requires_gradient_sync(True)
    else:
        yield


def local_grads(params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    """The gradients this rank holds: plain tensors, or an FSDP2 parameter's local shard."""
    out = []
    for p in params:
        g = p.grad
        if g is not None:
            out.append(g.to_local() if hasattr(g, "to_local") else g)
    return out


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """An FSDP2 model's full weights on rank 0's CPU (collective; None on the other ranks)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return sd if dist.get_rank() == 0 else None


def full_optimizer_state(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict | None:
    """An FSDP2 optimizer's full state keyed by parameter name, on rank 0 (collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    sd = get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return sd if dist.get_rank() == 0 else None


def named_optimizer_state(model: torch.nn.Module, opt: torch.optim.Optimizer, sd: dict) -> dict:
    """A torch.optim state dict (parameters numbered in param-group order) keyed by parameter name instead."""
    name = {id(p): n for n, p in model.named_parameters()}
    fqns = [name[id(p)] for g in opt.param_groups for p in g["params"]]
    groups, k = [], 0
    for g in sd["param_groups"]:
        groups.append({**g, "params": fqns[k:k + len(g["params"])]})
        k += len(g["params"])
    return {"state": {fqns[i]: s for i, s in sd["state"].items()}, "param_groups": groups}


def load_optimizer_state(model: torch.nn.Module, opt: torch.optim.Optimizer, sd: dict, named: bool) -> None:
    """Load a saved anchor optimizer state (numbered, as one process saves it, or named, as FSDP2 saves it)
    into opt, whatever the model's wrapping now."""
    if not named and not is_sharded(model):
        opt.load_state_dict(sd)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    if not named:
        sd = named_optimizer_state(model, opt, sd)
    set_optimizer_state_dict(model, opt, optim_state_dict=sd, options=StateDictOptions(full_state_dict=True))


__all__ = ["World", "close_world", "collective_errors", "full_model_state", "full_optimizer_state", "init_world",
           "is_sharded", "load_optimizer_state", "local_grads", "no_grad_sync", "wrap_anchor"]
