"""``parallel.engine=deepspeed``: the same model, sharded by ``moe.parallel`` as always, under
DeepSpeed ZeRO stage 1 or 2.

Expert parameters are DeepSpeed MoE parameters (``allreduce=False``, ``group_name``) in
their own optimizer groups (``split_params_into_different_moe_groups_for_optimizer``), and
the expert-parallel / expert-data-parallel process groups are DeepSpeed's own
(``ep_size_<N>``), which our all-to-all dispatcher uses too. ZeRO then partitions the
expert optimizer state over the expert-data-parallel group and the dense state over the
world, reduces gradients over those groups, clips by the global norm and skips steps whose
gradients are not finite.

Checkpoints are our usual ones (``checkpoint.py``): DeepSpeed's partitioned AdamW moments
are gathered per parameter through its tensor-fragment API, so a checkpoint written here
resumes under the native engine, at another layout, or here again.
"""

from __future__ import annotations

import deepspeed
import torch
from deepspeed.moe.layer import MoE
from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer
from deepspeed.utils import safe_get_full_optimizer_state, safe_set_full_optimizer_state
from deepspeed.utils.mixed_precision_linkage import lazy_init_hp_params_optimizer_state
from torch import nn

from moe.layers import MoELayer, expert_parameters
from moe.parallel.deepspeed_groups import group_name
from moe.parallel.world import World

from .config import RunConfig
from .faults import NonFiniteGuard
from .optim import adamw, param_groups

ADAM_MOMENTS = ("exp_avg", "exp_avg_sq")


class DeepSpeedMoEView(MoE):
    """How DeepSpeed recognises an MoE layer (``isinstance(module, MoE)`` turns on its
    MoE-aware ZeRO optimizer). A view with no parameters or forward of its own, one per MoE
    layer; DeepSpeed's ``__init__`` is skipped because it would build DeepSpeed's own
    experts and gate."""

    def __init__(self, num_experts: int, ep: int):
        nn.Module.__init__(self)
        self.num_experts, self.ep_size = num_experts, ep
        self.num_local_experts = num_experts // ep
        self.expert_group_name = group_name(ep)
        self.enable_expert_tensor_parallelism = False

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        """The groups exist already (``deepspeed_layout``, before the model was sharded)."""


class DeepSpeedModel(nn.Module):
    """What DeepSpeed wraps: our model, with the MoE views beside it rather than inside our
    layers (DeepSpeed finds MoE layers by walking the modules it is given)."""

    def __init__(self, model: nn.Module, ep: int):
        super().__init__()
        self.model = model
        self.moe_views = nn.ModuleList(
            DeepSpeedMoEView(layer.config.num_experts, ep)
            for layer in model.modules()
            if isinstance(layer, MoELayer)
        )

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)


class DeepSpeedEngine:
    """The engine interface of ``engine.py`` over ``deepspeed.initialize``: torch AdamW with
    our parameter groups, split into DeepSpeed's MoE groups, wrapped by ZeRO."""

    def __init__(self, model: nn.Module, cfg: RunConfig, world: World, accumulation: int):
        layout = world.layout
        if layout is None:
            raise RuntimeError("parallel.engine=deepspeed needs a process group")
        name = group_name(layout.ep)
        experts = expert_parameters(model)
        for p in model.parameters():
            if id(p) in experts:
                p.allreduce, p.group_name = False, name
        optimizer = adamw(
            split_params_into_different_moe_groups_for_optimizer(param_groups(model, cfg.optim)),
            cfg.optim,
        )
        config = {
            "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
            "gradient_accumulation_steps": accumulation,
            "gradient_clipping": max(cfg.train.grad_clip, 0.0),
            # Contiguous gradients and reduce-scatter: what DeepSpeed requires for MoE groups.
            "zero_optimization": {
                "stage": cfg.parallel.zero_stage,
                "contiguous_gradients": True,
                "reduce_scatter": True,
            },
            "zero_allow_untested_optimizer": True,  # torch AdamW, the native engine's optimizer
            "steps_per_print": 2**31 - 1,
        }
        self.model = model
        self.ds, self.optimizer, _, _ = deepspeed.initialize(
            model=DeepSpeedModel(model, layout.ep), optimizer=optimizer, config=config
        )
        self.forward_model = self.ds

    def backward(self, loss: torch.Tensor) -> None:
        """DeepSpeed's pattern: ``backward`` (it divides by the accumulation) and ``step`` on
        every micro-batch; it updates the weights on the last one of each optimizer step."""
        self.ds.backward(loss)
        self.ds.step()

    def step(self, guard: NonFiniteGuard, loss: float, step: int) -> tuple[float, bool]:
        """The update has happened (or DeepSpeed skipped it: non-finite gradients); report."""
        grad_norm = self.ds.get_global_grad_norm()
        grad_norm = float("nan") if grad_norm is None else float(grad_norm)
        guard.ok(loss, grad_norm, step)  # counts skips, stops after too many in a row
        return grad_norm, self.ds.was_step_applied()

    def _adam_state(self) -> dict:
        """The base optimizer's state per flat fp32 partition, created (zeros, step 0) if no
        step has run yet, and linked to the parameters' fragments. (ZeRO links them once,
        right after the first group's first step, when the other groups have no state yet.)"""
        zero = self.optimizer
        state = zero.optimizer.state
        for i, flat in enumerate(zero.single_partition_of_fp32_groups):
            if flat not in state:
                state[flat] = {"step": torch.tensor(0.0)}
                state[flat].update({k: torch.zeros_like(flat) for k in ADAM_MOMENTS})
            lazy_init_hp_params_optimizer_state(zero.bit16_groups[i], flat, state)
        zero._hp_optimizer_states_linked = True
        return state

    def state_dicts(self) -> tuple[dict, dict]:
        """Full (unpartitioned) AdamW moments per parameter name; collective over the world."""
        step = next(iter(self._adam_state().values()))["step"]
        state = {}
        for name, p in self.model.named_parameters():
            moments = {k: safe_get_full_optimizer_state(p, k) for k in ADAM_MOMENTS}
            state[name] = {"step": step.clone(), **moments}
        return self.model.state_dict(), {"state": state}

    def load_state_dicts(self, model_sd: dict, optim_sd: dict) -> None:
        self.model.load_state_dict(model_sd)
        self.optimizer.refresh_fp32_params()  # ZeRO's fp32 master copy of the weights
        adam = self._adam_state()
        for name, p in self.model.named_parameters():
            for k in ADAM_MOMENTS:
                safe_set_full_optimizer_state(p, optim_sd["state"][name][k], k)
        steps = {float(s["step"]) for s in optim_sd["state"].values()}
        for flat_state in adam.values():
            flat_state["step"] = torch.tensor(max(steps))
