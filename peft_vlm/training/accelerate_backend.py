"""One process, DDP or FSDP2 through `accelerate`: one AdamW per data stream, stepped after the last micro-batch.

The optimizer of the stream not being trained is not stepped, so neither its weight decay nor its momentum moves
anything; its gradients are dropped at the end of every step so that they cannot leak into a later one.
"""
from __future__ import annotations

import contextlib

import torch
from accelerate.utils import DistributedDataParallelKwargs
from torch import nn

from peft_vlm.training.backend import Backend, GroupMaker, full, placed_like


class AccelerateBackend(Backend):
    def accelerator_options(self) -> dict:
        return {"cpu": not torch.cuda.is_available(),
                "kwargs_handlers": [DistributedDataParallelKwargs(find_unused_parameters=True)]}

    def prepare(self, model: nn.Module, make_groups: GroupMaker) -> nn.Module:
        model = self._distribute(model)
        parameters = dict(self.accelerator.unwrap_model(model).named_parameters())  # FSDP2: the sharded ones
        self.optimizers = {stream: torch.optim.AdamW(groups, betas=self.config.betas)
                           for stream, groups in make_groups(parameters).items()}
        self.update: tuple[str, ...] = ()
        return self._prepared(model, self.optimizers)

    def _distribute(self, model: nn.Module) -> nn.Module:
        if self.config.sharding == "fsdp2" and self.accelerator.num_processes > 1 and not torch.cuda.is_available():
            # accelerate's FSDP plugin needs GPUs (on CPU it silently falls back to DDP), so shard with torch's
            # FSDP2 directly: every decoder layer, then the rest.
            from torch.distributed.fsdp import fully_shard

            for layer in model.language_model.model.layers:
                fully_shard(layer)
            fully_shard(model)
            return model
        return self.accelerator.prepare(model)

    def param_groups(self, stream: str) -> list[dict]:
        return self.optimizers[stream].param_groups

    def sync(self, last: bool):
        if last or self.config.sharding == "fsdp2":
            return contextlib.nullcontext()
        return self.accelerator.no_sync(self.model)

    def empty_loss(self, parameters, stand_in):
        return sum((p * 0).sum() for p in parameters)

    def backward(self, loss, micro_batches, update=None):
        self.accelerator.backward(loss / micro_batches)
        if update is not None:
            self.update = update

    def step(self) -> None:
        for stream in self.update:
            optimizer = self.optimizers[stream]
            if self.config.max_grad_norm:  # this stream's gradients alone
                parameters = [p for group in optimizer.param_groups for p in group["params"]]
                torch.nn.utils.clip_grad_norm_(parameters, self.config.max_grad_norm)
            optimizer.step()
        for optimizer in self.optimizers.values():
            optimizer.zero_grad(set_to_none=True)
        self.update = ()

    def optimizer_states(self) -> dict[str, dict]:
        states = {}
        for stream, optimizer in self.optimizers.items():
            state = {}
            for group in optimizer.param_groups:
                for name, parameter in zip(group["names"], group["params"]):
                    if parameter in optimizer.state:
                        state[name] = {key: full(value) for key, value in optimizer.state[parameter].items()}
            groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
            states[stream] = {"state": state, "param_groups": groups}
        return states

    def load_state(self, folder, tensors, optimizer_states) -> None:
        parameters = dict(self.unwrapped.named_parameters())
        with torch.no_grad():
            for name, tensor in tensors.items():
                parameters[name].copy_(placed_like(parameters[name], tensor.to(parameters[name].dtype)))
        for stream, optimizer in self.optimizers.items():
            saved = optimizer_states[stream]["state"]
            for group in optimizer.param_groups:
                for name, parameter in zip(group["names"], group["params"]):
                    if name in saved:
                        optimizer.state[parameter] = {k: placed_like(parameter, v) for k, v in saved[name].items()}
