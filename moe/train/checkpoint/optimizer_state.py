"""Full fp32 master weights and Adam moments of every parameter, whatever DeepSpeed wrapped the
optimizer in (plain, ZeRO 1/2, bf16): what a checkpoint saves and restores, read and written through
DeepSpeed's tensor-fragment API (moe/parallel/deepspeed.py)."""
from __future__ import annotations

from typing import Dict, List

import torch

from moe.parallel.deepspeed import (optimizer_wrapping, relink_optimizer_state, safe_get_full_fp32_param,
                                    safe_get_full_optimizer_state, safe_set_full_fp32_param,
                                    safe_set_full_optimizer_state)


class OptimizerState:
    """Full fp32 master weights and Adam moments of the model's parameters, whatever DeepSpeed wrapped
    the optimizer in. `get_*` may be collectives (ZeRO): call them on every rank, for every parameter,
    in the same order."""

    def __init__(self, engine) -> None:
        self.engine = engine
        opt = engine.optimizer
        self.opt = opt
        wrapping = optimizer_wrapping(opt)  # which DeepSpeed wrapper (read in moe/parallel/deepspeed.py)
        self.kind, self.inner = wrapping.kind, wrapping.inner
        if self.kind == "fragments":  # ZeRO 1/2 or BF16_Optimizer: partitioned flat fp32 buffers
            self.flats = wrapping.flats
            if self.has_state():
                self._relink()
        elif self.kind == "wrapped":  # bf16/fp16 without ZeRO: fp32 copies next to the model's params
            self.master = wrapping.master
        # else "plain": a torch optimizer on the model's own (fp32) parameters
        self.keys = self._moment_keys()

    def _relink(self) -> None:
        """(Re)build the parameters' views into the optimizer state. DeepSpeed 0.19 links them once,
        right after the step of the first parameter group, when the torch optimizer has not yet
        created the state of the other groups: their views then lack the moments (`exp_avg not
        found in optimizer state fragment`). Views only; nothing is copied."""
        relink_optimizer_state(self.opt)

    def _moment_keys(self) -> List[str]:
        for state in self.inner.state.values():
            keys = sorted(k for k, v in state.items() if torch.is_tensor(v) and v.dim() > 0)
            if keys:
                return keys
        return ["exp_avg", "exp_avg_sq"]

    def _hp(self, p: torch.Tensor) -> torch.Tensor:
        return self.master[id(p)] if self.kind == "wrapped" else p

    def has_state(self) -> bool:
        return any(len(state) > 0 for state in self.inner.state.values())

    def get_master(self, p: torch.Tensor) -> torch.Tensor:
        if self.kind == "fragments":
            return safe_get_full_fp32_param(p).detach().float().cpu()
        return self._hp(p).detach().float().cpu()

    def get_moments(self, p: torch.Tensor) -> Dict[str, torch.Tensor]:
        if not self.has_state():
            return {}
        if self.kind == "fragments":
            return {k: safe_get_full_optimizer_state(p, k).detach().float().cpu() for k in self.keys}
        hp = self._hp(p)
        state = self.inner.state.get(hp, {})  # a parameter that never had a gradient has no state yet
        return {k: (state[k] if k in state else torch.zeros_like(hp)).detach().float().cpu() for k in self.keys}

    def step_count(self) -> int:
        for state in self.inner.state.values():
            if "step" in state:
                return int(float(state["step"]))
        return 0

    def set(self, p: torch.Tensor, master: torch.Tensor, moments: Dict[str, torch.Tensor]) -> None:
        """Set the parameter (and its fp32 master) and its moments from full-size tensors."""
        with torch.no_grad():
            p.data.copy_(master.to(p.device, p.dtype))
            if self.kind == "fragments":
                safe_set_full_fp32_param(p, master.to(p.device, torch.float32))
                for k, v in moments.items():
                    safe_set_full_optimizer_state(p, v.to(p.device, torch.float32), k)
                return
            hp = self._hp(p)
            if hp is not p:
                hp.data.copy_(master.to(hp.device, hp.dtype))
            if moments:
                state = self.inner.state[hp]
                for k, v in moments.items():
                    state[k] = v.to(hp.device, hp.dtype).clone()

    def prepare(self, step: int, keys: List[str]) -> None:
        """Create the optimizer state (torch optimizers create it lazily at their first step) with the
        saved step count, so moments can be written into it."""
        if self.kind == "fragments":
            targets = self.flats
        else:
            targets = [self._hp(p) for g in self.inner.param_groups for p in g["params"]]
        for t in targets:
            state = self.inner.state[t]
            state["step"] = torch.tensor(float(step), dtype=torch.float32)
            for k in keys:
                if k not in state:
                    state[k] = torch.zeros_like(t, memory_format=torch.preserve_format)
        if self.kind == "fragments":
            self._relink()
        self.keys = list(keys)
