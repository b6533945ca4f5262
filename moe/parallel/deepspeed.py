"""The one module of moe/ that touches DeepSpeed: every import of it, every private attribute, the class
swap that makes its engine see our MoE layers, the group tables, the engine, the optimizer wrappers.

Each function names the DeepSpeed behaviour it relies on (checked against 0.19, `TESTED`), and
tests/unit/parallel/test_deepspeed.py checks those behaviours against the installed DeepSpeed, so an
upgrade that changes one fails there, by name, rather than as a silently wrong gradient.

`import deepspeed` (and torch.distributed) is deferred to the functions: it takes seconds and prints,
and most `moe` commands never build an engine.
"""
from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Tuple

import torch
from torch import nn

TESTED = "0.19"
"""The DeepSpeed release (major.minor) whose behaviour the functions below were checked against."""


# --------------------------------------------------------------------------------- process groups


def load() -> None:
    """Import DeepSpeed now. Its import sets PYTORCH_NVML_BASED_CUDA_CHECK=1 (deepspeed/__init__.py),
    which the torch.cuda calls of `init_distributed` read: import it before them."""
    import deepspeed  # noqa: F401


def init_process_group(backend: str, timeout_s: float) -> None:
    """The default process group, through `deepspeed.init_distributed` (public API) so DeepSpeed's comm
    layer (`deepspeed.comm`, used by its engine) is set up on it."""
    import deepspeed

    skip_shared_memory_allreduce()
    deepspeed.init_distributed(dist_backend=backend, timeout=datetime.timedelta(seconds=timeout_s))


SHM_OP = "deepspeed_shm_comm"
"""The op DeepSpeed's comm layer builds when it starts on CPU (`build_shm_op`, deepspeed/comm/torch.py)."""


def skip_shared_memory_allreduce() -> None:
    """Keep DeepSpeed's comm layer from building and starting its shared-memory all-reduce op on CPU.

    `TorchBackend.__init__` JIT-builds that op (`build_shm_op`) unless `deepspeed.ops.__compatible_ops__`
    marks it incompatible, then maps a shared-memory workspace per rank. The op serves only
    `inference_all_reduce` (DeepSpeed inference), which training never calls: gradients, the expert
    exchange and our collectives go through torch.distributed. Building it cost every CPU rank a
    compiler check on start-up, and torch's JIT loader takes a lock file on each load that a killed
    process leaves behind, after which every later start waits on it forever (a CI run did, until its
    time limit)."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__[SHM_OP] = False


def preset_world_group(timeout_s: float) -> None:
    """Create DeepSpeed's clone of the world group with our timeout. DeepSpeed reduces gradients over
    `deepspeed.utils.groups._WORLD_GROUP`, which `groups._clone_world_group` creates on first use,
    without a timeout (torch's 30-minute default), unless it is already set: setting it first makes a
    dead or stuck rank end the all-reduce within timeout_s."""
    import torch.distributed as dist
    from deepspeed.utils import groups

    if groups._WORLD_GROUP is None:
        groups._WORLD_GROUP = dist.new_group(ranks=list(range(dist.get_world_size())),
                                             timeout=datetime.timedelta(seconds=timeout_s))


def expert_groups_registered(name: str) -> bool:
    """Whether this rank's expert-parallel groups `name` (`ep_size_{P}`) are in DeepSpeed's tables
    (`deepspeed.utils.groups._EXPERT_PARALLEL_GROUP`, a dict by group name)."""
    from deepspeed.utils import groups

    return name in groups._EXPERT_PARALLEL_GROUP


def register_expert_groups(name: str, ep_group: Any, ep_ranks: List[int], edp_group: Any,
                           edp_ranks: List[int]) -> None:
    """Put groups we created (with our timeout) into DeepSpeed's tables, where its engine and ZeRO look
    up the group of an expert parameter by its `group_name` (`_EXPERT_PARALLEL_GROUP[_RANKS]`,
    `_EXPERT_DATA_PARALLEL_GROUP[_RANKS]`: dicts by name, this rank's group and its ranks). Its own
    `_create_expert_and_data_parallel` would create the same layout (EP groups of consecutive
    ranks, strided EDP groups) without a timeout."""
    from deepspeed.utils import groups

    groups._EXPERT_DATA_PARALLEL_GROUP[name] = edp_group
    groups._EXPERT_DATA_PARALLEL_GROUP_RANKS[name] = edp_ranks
    groups._EXPERT_PARALLEL_GROUP[name] = ep_group
    groups._EXPERT_PARALLEL_GROUP_RANKS[name] = ep_ranks


def expert_groups(name: str) -> Tuple[Any, List[int], Any, List[int]]:
    """(EP group, its ranks, EDP group, its ranks) of this rank under `name`, from DeepSpeed's tables."""
    from deepspeed.utils import groups

    return (groups._EXPERT_PARALLEL_GROUP[name], list(groups._EXPERT_PARALLEL_GROUP_RANKS[name]),
            groups._EXPERT_DATA_PARALLEL_GROUP[name], list(groups._EXPERT_DATA_PARALLEL_GROUP_RANKS[name]))


def expert_parallel_group(group_name: str):
    """The EP group an expert parameter of `group_name` belongs to (`groups._get_expert_parallel_group`)."""
    from deepspeed.utils import groups

    return groups._get_expert_parallel_group(group_name)


# ------------------------------------------------------------------------------ expert parameters


def mark_expert_param(p: torch.Tensor, group_name: str) -> None:
    """Mark `p` as an expert parameter the way DeepSpeed reads it: `allreduce=False` (so the engine
    does not all-reduce it over data parallel; `deepspeed.moe.utils.is_moe_param`) and `group_name`
    (the expert groups it is reduced over, by `_reduce_expert_gradients` and ZeRO)."""
    p.allreduce = False
    p.group_name = group_name


def is_expert_param(p: torch.Tensor) -> bool:
    """DeepSpeed's definition (`deepspeed.moe.utils.is_moe_param`), without importing it."""
    return hasattr(p, "allreduce") and not p.allreduce


def split_moe_param_groups(groups: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """`deepspeed.moe.utils.split_params_into_different_moe_groups_for_optimizer` (public API): moves
    expert parameters into groups of their own (`moe: True`, by group name) so the engine reduces them
    over their expert-data-parallel group; without marked parameters it changes nothing."""
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    return split_params_into_different_moe_groups_for_optimizer(groups)


_ADAPTED: Dict[type, type] = {}


def recognise_as_moe(layer: nn.Module) -> None:
    """Make `isinstance(layer, deepspeed.moe.layer.MoE)` hold: DeepSpeed's engine finds MoE layers that
    way only (`DeepSpeedEngine._configure_distributed_model` sets `has_moe_layers`, and only then
    reduces expert gradients over the expert-data-parallel groups; parameters marked `allreduce=False`
    are otherwise silently never reduced). Only the class changes, to a subclass of both: no state,
    parameter name or forward changes (our class comes first in the MRO; MoE.__init__ never runs).
    MoE.set_deepspeed_parallelism, which the engine calls to create groups for DeepSpeed's own expert
    module, becomes a no-op: we created and registered ours."""
    from deepspeed.moe.layer import MoE

    cls = type(layer)
    if isinstance(layer, MoE):
        return
    if cls not in _ADAPTED:
        def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
            return None

        _ADAPTED[cls] = type(f"DeepSpeed{cls.__name__}", (cls, MoE), {
            "set_deepspeed_parallelism": set_deepspeed_parallelism,
            "forward": cls.forward,
            "__module__": __name__,
            "__doc__": f"{cls.__name__} recognised by DeepSpeed as an MoE layer (see moe.parallel.deepspeed)."})
    layer.__class__ = _ADAPTED[cls]


# ----------------------------------------------------------------------------------------- engine


def initialize(model: nn.Module, optimizer, lr_scheduler, config: Dict[str, Any]):
    """`deepspeed.initialize` (public API): (engine, optimizer as wrapped, lr_scheduler)."""
    import deepspeed

    engine, optimizer, _, lr_scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=lr_scheduler, config=config)
    return engine, optimizer, lr_scheduler


def has_moe_layers(engine) -> bool:
    """Whether the engine found MoE layers (`DeepSpeedEngine.has_moe_layers`; see `recognise_as_moe`)."""
    return bool(engine.has_moe_layers)


def skip_allreduce_of_one_process(engine) -> bool:
    """One process without ZeRO has no gradient to all-reduce, yet `DeepSpeedEngine.allreduce_gradients`
    still flattens every gradient into buckets, "reduces" them over the group of one and copies them back
    (`buffered_allreduce_fallback`): two extra passes over all gradients per step (on a CPU ~4 ms of the
    fine-grained quickstart's step, whose expert weights are 6x its active parameters). Turn the engine's
    backward all-reduce off there, as DeepSpeed does itself without a process group
    (`enable_backward_allreduce`). An optimizer wrapper that learns the accumulation boundary from that
    call (`set_gradient_accumulation_boundary`) keeps it. Returns whether it was turned off."""
    import torch.distributed as dist

    if (engine.zero_optimization_stage() == 0 and dist.is_initialized() and dist.get_world_size() == 1
            and not hasattr(engine.optimizer, "set_gradient_accumulation_boundary")):
        engine.enable_backward_allreduce = False
        return True
    return False


def replace_fp32_clipping(engine, clip: Callable[[], torch.Tensor]) -> None:
    """Have the engine clip fp32 gradients (no ZeRO, no bf16/fp16) with `clip()`, which clips in place
    and returns the norm. `DeepSpeedEngine._take_model_step` calls `self.clip_fp32_gradients()` there
    (looked up on the instance, so an instance attribute replaces it); DeepSpeed's own averages the
    per-rank norms under EP. The norm goes where `engine.get_global_grad_norm()` reads it
    (`engine._global_grad_norm`)."""
    def clip_fp32_gradients():
        engine._global_grad_norm = float(clip())

    engine.clip_fp32_gradients = clip_fp32_gradients


def wraps_low_precision(optimizer) -> bool:
    """Whether the engine's optimizer is DeepSpeed's bf16/fp16 wrapper without ZeRO
    (`FP16_UnfusedOptimizer` / `FP16_Optimizer`: `fp16_groups`, `clip_grad`)."""
    return hasattr(optimizer, "clip_grad") and hasattr(optimizer, "fp16_groups")


def replace_low_precision_clipping(optimizer, clip: Callable[[List[torch.Tensor], float], torch.Tensor]) -> None:
    """Clip the low-precision gradients of a bf16/fp16 wrapper (`wraps_low_precision`) with
    `clip(params, loss_scale)` (clips in place, returns the unscaled norm) before its step, and turn
    its own clipping off: `FP16_UnfusedOptimizer.step` leaves expert gradients out of the norm under
    EP. Relies on its `clip_grad` (0 disables clipping), `fp16_groups` (the model's parameters),
    `loss_scale_config.cur_scale`, and `_global_grad_norm` (what `get_global_grad_norm` reads)."""
    original_step = optimizer.step
    optimizer.clip_grad = 0.0

    def step(*args, **kwargs):
        scale = float(getattr(getattr(optimizer, "loss_scale_config", None), "cur_scale", 1.0) or 1.0)
        norm = clip([p for g in optimizer.fp16_groups for p in g], scale)
        result = original_step(*args, **kwargs)
        optimizer._global_grad_norm = float(norm)
        return result

    optimizer.step = step


# ------------------------------------------------------------------------------ optimizer state


@dataclass
class OptimizerWrapping:
    """How DeepSpeed wrapped the torch optimizer: `kind` is "fragments" (ZeRO 1/2 or BF16_Optimizer:
    partitioned flat fp32 buffers, `flats`, read through the tensor-fragment API), "wrapped" (bf16/fp16
    without ZeRO: fp32 copies next to the model's parameters, `master` {id(param): fp32 copy}) or
    "plain" (the torch optimizer on the model's own parameters); `inner` is the torch optimizer."""
    kind: str
    inner: Any
    flats: List[torch.Tensor] = field(default_factory=list)
    master: Dict[int, torch.Tensor] = field(default_factory=dict)


def optimizer_wrapping(optimizer) -> OptimizerWrapping:
    """Read from the wrappers' attributes: ZeRO 1/2 `single_partition_of_fp32_groups`, BF16_Optimizer
    `fp32_groups_flat_partition`, FP16_(Unfused)Optimizer `fp16_groups`/`fp32_groups`, each with the
    torch optimizer as `.optimizer`."""
    if hasattr(optimizer, "single_partition_of_fp32_groups") or hasattr(optimizer, "fp32_groups_flat_partition"):
        flats = list(getattr(optimizer, "single_partition_of_fp32_groups", None)
                     or optimizer.fp32_groups_flat_partition)
        return OptimizerWrapping("fragments", optimizer.optimizer, flats=flats)
    if hasattr(optimizer, "fp16_groups") and hasattr(optimizer, "fp32_groups"):
        master = {id(lp): hp for lg, hg in zip(optimizer.fp16_groups, optimizer.fp32_groups) for lp, hp in zip(lg, hg)}
        return OptimizerWrapping("wrapped", optimizer.optimizer, master=master)
    return OptimizerWrapping("plain", optimizer)


def relink_optimizer_state(optimizer) -> None:
    """(Re)build the parameters' views into the optimizer state of a "fragments" wrapper. DeepSpeed 0.19
    links them once (`_lazy_init_hp_params_optimizer_state`, guarded by `_hp_optimizer_states_linked`),
    right after the step of the first parameter group, when the torch optimizer has not yet created
    the state of the other groups: their views then lack the moments (`exp_avg not found in optimizer
    state fragment`). Clearing the flag and linking again fixes them. Views only; nothing is copied."""
    optimizer._hp_optimizer_states_linked = False
    optimizer._lazy_init_hp_params_optimizer_state()


def safe_get_full_fp32_param(p: torch.Tensor) -> torch.Tensor:
    """`deepspeed.utils.safe_get_full_fp32_param` (public tensor-fragment API; a collective under ZeRO)."""
    from deepspeed.utils import safe_get_full_fp32_param as get

    return get(p)


def safe_get_full_optimizer_state(p: torch.Tensor, key: str) -> torch.Tensor:
    """`deepspeed.utils.safe_get_full_optimizer_state` (public tensor-fragment API; a collective under ZeRO)."""
    from deepspeed.utils import safe_get_full_optimizer_state as get

    return get(p, key)


def safe_set_full_fp32_param(p: torch.Tensor, value: torch.Tensor) -> None:
    """`deepspeed.utils.safe_set_full_fp32_param` (public tensor-fragment API)."""
    from deepspeed.utils import safe_set_full_fp32_param as set_

    set_(p, value)


def safe_set_full_optimizer_state(p: torch.Tensor, value: torch.Tensor, key: str) -> None:
    """`deepspeed.utils.safe_set_full_optimizer_state` (public tensor-fragment API)."""
    from deepspeed.utils import safe_set_full_optimizer_state as set_

    set_(p, value, key)
