"""`--strategy fsdp`: the diffusion U-Net fully sharded over all processes (PyTorch FSDP2, `fully_shard`).

Lightning's `ModelParallelStrategy` runs it (process groups, device mesh, distributed sampler, full-state
checkpoints); `DDPM.configure_model` calls `shard_diffusion_model`, which wraps
- every ResBlock, SpatialTransformer and AttentionBlock of the U-Net, then the U-Net itself (the leftovers: time
  embedding, input and output convolutions), and a trainable conditioner (its `encode` runs through FSDP too);
- the EMA: LitEma's buffers become DTensors sharded like the parameters they follow, so the EMA update and the
  EMA scope (validation, sampling) are local to each shard, without gathering.
The frozen first stage and a frozen conditioner stay whole on every process (no gradients, no optimizer state).
Activation checkpointing is the U-Net's own `use_checkpoint: true` (each ResBlock / transformer block recomputes its
activations in the backward pass), which works inside the sharded blocks.

Checkpoints are one file, gathered on rank 0 (`save_distributed_checkpoint=False`), with the same keys as a
single-process run (`model_ema.*` included): `ldm.load_model`, `scripts/sample.py` and `-r` read them as usual.
Lightning's `FSDPStrategy` (FSDP1, strategy="fsdp" in Lightning) is not used: it requires CUDA, and its flat
parameters do not let an EMA follow the shards.
"""
from typing import Any

import torch
from pytorch_lightning.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor, distribute_tensor

from ldm.modules.diffusionmodules.attention import AttentionBlock, SpatialTransformer
from ldm.modules.diffusionmodules.resblock import ResBlock
from ldm.modules.ema import LitEma
from ldm.util import ConfigError

WRAPPED_BLOCKS = (ResBlock, SpatialTransformer, AttentionBlock)  # one FSDP unit each


class FullyShardedStrategy(ModelParallelStrategy):
    """ModelParallelStrategy with all processes (num_nodes x devices) in one sharding group, and checkpoints as one
    file written by rank 0."""

    def __init__(self, **kwargs: Any):
        super().__init__(save_distributed_checkpoint=False, **kwargs)

    def setup_environment(self) -> None:
        self._data_parallel_size, self._tensor_parallel_size = self.num_nodes * self.num_processes, 1
        super().setup_environment()


def fully_sharded_strategy(model: nn.Module) -> FullyShardedStrategy:
    """The strategy for `--strategy fsdp`; only diffusion models (DDPM and subclasses) know how to be sharded."""
    if not callable(getattr(model, "shard", None)):
        raise ConfigError(f"--strategy fsdp shards diffusion U-Nets (ldm.models.ddpm.DDPM, LatentDiffusion); "
                          f"{type(model).__name__} is not one: use --strategy ddp")
    return FullyShardedStrategy()


def shard_diffusion_model(module: nn.Module, mesh: DeviceMesh) -> None:
    """Shard `module`'s U-Net (its blocks, then itself), a trainable conditioner and the EMA over `mesh`, in place."""
    unet = module.model.diffusion_model
    if isinstance(unet, FSDPModule):  # configure_model runs again for test after fit
        return
    for block in unet.modules():
        if isinstance(block, WRAPPED_BLOCKS):
            fully_shard(block, mesh=mesh)
    fully_shard(unet, mesh=mesh, reshard_after_forward=True)  # at rest every parameter is a shard
    cond = getattr(module, "cond_stage_model", None)
    if getattr(module, "cond_stage_trainable", False) and isinstance(cond, nn.Module) and any(
            p.requires_grad for p in cond.parameters()):
        fully_shard(cond, mesh=mesh, reshard_after_forward=True)
        method = getattr(module, "cond_stage_forward", None) or ("encode" if hasattr(cond, "encode") else None)
        if method:
            register_fsdp_forward_method(cond, method)
    whole = [name for name, p in module.named_parameters() if p.requires_grad and not isinstance(p, DTensor)]
    if whole:  # their gradients would not be synchronised
        raise ConfigError(f"--strategy fsdp: trainable parameters outside the U-Net and the conditioner are not "
                          f"sharded: {', '.join(whole[:5])}; use --strategy ddp (or freeze them)")
    if getattr(module, "model_ema", None) is not None:
        shard_ema(module.model_ema, module.model)


@torch.no_grad()
def shard_ema(ema: LitEma, model: nn.Module) -> None:
    """Each EMA buffer becomes a DTensor placed like the (sharded) parameter it follows."""
    params = dict(model.named_parameters())
    for name, buffer_name in ema.m_name2s_name.items():
        param = params[name]
        if isinstance(param, DTensor):
            full = getattr(ema, buffer_name).to(param.device)
            ema.register_buffer(buffer_name, distribute_tensor(full, param.device_mesh, param.placements))


def is_sharded(module: nn.Module) -> bool:
    """Whether any parameter of `module` is a shard (a forward pass then needs every process)."""
    return any(isinstance(p, DTensor) for p in module.parameters())
