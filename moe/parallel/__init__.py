"""Distributed setup, applied to the model from outside: the model never calls into DeepSpeed.

    distributed.py  the default process group (`init_distributed`; one process needs no launcher),
                    world info, timeouts, `collective_failure` / `CollectiveError` naming a failed
                    collective
    engine.py       `build_engine`, `apply_compile`, `grad_norm`, the optimizer groups, LR schedule
                    and DeepSpeed config
    expert.py       expert parallelism: `apply_expert_parallel`, which experts a rank holds
                    (`shard_experts`, `expert_layout`), `gather_experts`, `model_groups`
    groups.py       the EP and EDP process groups, with the run's timeout
    exchange.py     the all-to-all token exchange (forward/backward), timed, failures named
    clipping.py     the gradient norm and clipping with every expert counted once
    telemetry.py    `ep_metrics`: exchange time and token imbalance across ranks
    recompute.py    activation recompute (`apply_recompute`, train.recompute), side effects counted once
    faults.py       test-only switches (a mis-scaled expert gradient, a dying or stuck rank)
    deepspeed.py    the one module that touches DeepSpeed (its imports, private attributes, the MoE
                    class swap, group tables, engine, optimizer wrappers)

`build_engine` applies, in order: expert parallelism (when parallel.ep_size > 1), activation recompute
(train.recompute), torch.compile of the
blocks (train.compile), AdamW over DeepSpeed's MoE parameter groups, the LR schedule,
`deepspeed.initialize`, and under EP the fix of DeepSpeed's non-ZeRO gradient clipping.
"""
from moe.parallel.clipping import clip_grad_norm_, fix_engine_clipping, global_grad_norm
from moe.parallel.deepspeed import is_expert_param
from moe.parallel.distributed import (CollectiveError, DistInfo, collective_failure, init_distributed,
                                      shutdown_distributed, world_size_from_env)
from moe.parallel.engine import (apply_compile, build_engine, deepspeed_config, grad_norm, lr_lambda,
                                 optimizer_param_groups, resolve_dtype)
from moe.parallel.exchange import TokenExchange
from moe.parallel.expert import (EXPERT_PARAM_NAMES, apply_expert_parallel, check_supported, expert_layout,
                                 gather_experts, model_groups, moe_layers, shard_experts)
from moe.parallel.groups import ExpertParallelGroups, create_groups
from moe.parallel.recompute import RECOMPUTE_MODES, apply_recompute
from moe.parallel.telemetry import ep_metrics, exchanges

__all__ = [
    "CollectiveError", "DistInfo", "EXPERT_PARAM_NAMES", "ExpertParallelGroups", "RECOMPUTE_MODES",
    "TokenExchange", "apply_compile", "apply_recompute", "apply_expert_parallel", "build_engine", "check_supported", "clip_grad_norm_",
    "collective_failure", "create_groups", "deepspeed_config", "ep_metrics", "exchanges", "expert_layout",
    "fix_engine_clipping", "gather_experts", "global_grad_norm", "grad_norm", "init_distributed",
    "is_expert_param", "lr_lambda", "model_groups", "moe_layers", "optimizer_param_groups", "resolve_dtype",
    "shard_experts", "shutdown_distributed", "world_size_from_env",
]
