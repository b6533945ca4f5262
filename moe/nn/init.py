"""Layout-free initialisation of a model built on the `meta` device, materialised on a rank's device.

A training run builds `GPT` under `torch.device("meta")` (no memory), expert parallelism keeps each
rank's slice of the experts (still on meta), then `materialize` allocates on the rank's device only
what the rank holds and `init_weights` fills it. Every value comes from a generator keyed by
(run.seed, parameter name), and each routed expert's weights from one keyed by (run.seed, parameter
name with its layer, global expert id): a rank draws its own experts without drawing the others', and
EP=N starts from exactly the weights of EP=1. The numbers are drawn on the CPU (one expert or one
non-expert tensor at a time) and copied to the device, so a GPU run starts from the CPU run's weights.

The distributions are the model's (moe/nn/gpt.py `init_stds`): normal(model.init_std) for the
embedding, the head, attention's input projection and the FFNs' gate/up projections; normal(init_std
/ sqrt(2 n_layers)) for the projections writing into the residual stream (attention output, FFN and
expert down projections); normal(0.02) for router weights (as moe/routing/base.py), zeros for the
noisy-gating weights, ones for RMSNorm weights. Buffers: the RoPE tables, and the routers' balancing
state at its start (zero bias and step load, uniform global load). A parameter no rule covers is an
error, so a new kind of weight cannot start uninitialised.

`materialize` keeps the Parameter objects' attributes (DeepSpeed's expert marks) and tied weights
tied. Loading weights instead (a checkpoint, `model.init_from`) replaces `init_weights` after
`materialize`: see moe/parallel/engine.py `build_engine`.
"""
from __future__ import annotations

import contextlib
import hashlib
from typing import Dict, Optional, Tuple

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from moe.config import attention_heads
from moe.nn.experts import Experts
from moe.nn.gpt import init_stds, rope_tables

ROUTER_INIT_STD = 0.02  # moe/routing/base.py Router.__init__


_INIT_FUNCTIONS = frozenset(f for name, f in vars(nn.init).items()
                            if callable(f) and name.endswith("_") and not name.startswith("_"))


class _SkipInitOnMeta(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _INIT_FUNCTIONS:  # torch.nn.init passes the tensor by keyword
            tensor = args[0] if args else kwargs.get("tensor")
            if isinstance(tensor, torch.Tensor) and tensor.is_meta:
                return tensor
        return func(*args, **kwargs)


@contextlib.contextmanager
def meta_device():
    """`torch.device("meta")` for building a model that `materialize` and `init_weights` (or loaded weights)
    fill later, or that is only counted: the torch.nn.init calls of the modules' constructors are skipped
    on meta tensors. They would set nothing there, and on meta they run torch's Python decompositions,
    whose first call imports torch._dynamo: ~1.5 s, which commands that only count a model (`moe plan`,
    `moe match`, launch and sweep checks) no longer pay. (A training process imports it anyway, at its
    optimizer's first `add_param_group`.)"""
    with torch.device("meta"), _SkipInitOnMeta():
        yield


def generator(seed: int, key: str) -> torch.Generator:
    """A CPU generator seeded from (seed, key) by a stable hash (the same on every rank and run)."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2 ** 63 - 1))


def has_meta(model: nn.Module) -> bool:
    return any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))


def materialize(model: nn.Module, device: torch.device) -> None:
    """Allocate (uninitialised) on `device` every parameter and buffer still on meta, in place. The new
    Parameters keep the old ones' attributes; a parameter shared by two modules stays shared."""
    done: Dict[int, torch.Tensor] = {}
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is None or not p.is_meta:
                continue
            if id(p) not in done:
                new = nn.Parameter(torch.empty_like(p, device=device), requires_grad=p.requires_grad)
                new.__dict__.update(p.__dict__)
                done[id(p)] = new
            module._parameters[name] = done[id(p)]
        for name, b in list(module._buffers.items()):
            if b is not None and b.is_meta:
                module._buffers[name] = torch.empty_like(b, device=device)


def _rule(name: str, init_std: float, out_std: float) -> Tuple[str, float]:
    """(kind, std) of a parameter by its name: kind is normal, zeros or ones."""
    if name.endswith("norm.weight"):
        return "ones", 1.0
    if name.endswith("router.noise_weight"):
        return "zeros", 0.0
    if name.endswith("router.weight"):
        return "normal", ROUTER_INIT_STD
    if name.endswith(("embed.weight", "head.weight", "attn.qkv.weight", "w13.weight", "experts.w13")):
        return "normal", init_std
    if name.endswith(("attn.proj.weight", "w2.weight", "experts.w2")):
        return "normal", out_std
    raise RuntimeError(f"moe/nn/init.py has no initialisation rule for parameter {name}")


def _fill(t: torch.Tensor, kind: str, std: float, gen: Optional[torch.Generator]) -> None:
    with torch.no_grad():
        if kind == "ones":
            t.fill_(1.0)
        elif kind == "zeros":
            t.zero_()
        else:
            t.copy_(torch.empty(t.shape, dtype=torch.float32).normal_(0.0, std, generator=gen))


def init_weights(model: nn.Module, seed: int) -> None:
    """Initialise every parameter and buffer of a GPT from (seed, name) keyed generators (see the
    module docstring); routed experts per global expert id (`ep_offset` of an expert-parallel slice)."""
    cfg = model.cfg
    init_std, out_std = init_stds(cfg.init_std, cfg.n_layers)
    seen = set()
    for mname, module in model.named_modules():
        for pname, p in module._parameters.items():
            if p is None or id(p) in seen:
                continue
            seen.add(id(p))
            name = f"{mname}.{pname}" if mname else pname
            kind, std = _rule(name, init_std, out_std)
            if isinstance(module, Experts):
                offset = getattr(module, "ep_offset", 0)
                for j in range(p.shape[0]):
                    _fill(p[j], kind, std, generator(seed, f"{name}:expert{offset + j}"))
            else:
                _fill(p, kind, std, generator(seed, name))
    _init_buffers(model)


def _init_buffers(model: nn.Module) -> None:
    cfg = model.cfg
    with torch.no_grad():
        cos, sin = rope_tables(attention_heads(cfg)[2], cfg.max_seq_len, cfg.rope_theta)
        model.rope_cos.copy_(cos)
        model.rope_sin.copy_(sin)
        for module in model.modules():
            for name in ("expert_bias", "step_load"):
                if getattr(module, name, None) is not None and name in module._buffers:
                    module._buffers[name].zero_()
            load = module._buffers.get("global_load") if hasattr(module, "_buffers") else None
            if load is not None:
                load.fill_(1.0 / load.numel())
