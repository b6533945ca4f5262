"""moe/parallel/engine.py: what is applied to the model before the engine (torch.compile,
`train.compile`), the optimizer groups, the LR schedule and the DeepSpeed config. Expert parallelism
and the DeepSpeed engine are covered end to end in tests/integration/test_expert_parallel.py and
test_train.py."""
import copy
import math

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from moe.config import load_config
from moe.metrics import router_metrics
from moe.nn.gpt import GPT
from moe.parallel import deepspeed as ds
from moe.parallel.engine import (apply_compile, deepspeed_config, lr_lambda, materialize_model, optimizer_param_groups,
                                 resolve_dtype)


def _tiny(overrides):
    return load_config(None, ["model.vocab_size=61", "model.d_model=32", "model.n_layers=4", "model.n_heads=2",
                              "model.max_seq_len=32", "model.ffn_hidden=64", "model.moe.num_experts=4",
                              "model.moe.moe_every=2", *overrides]).model


def _step(model, opt, x):
    out = model(x[:, :-1], x[:, 1:])
    (out.loss + out.aux_loss).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(out.loss.detach())


def _round(model, opt, batches):
    """Train steps, an evaluation forward and a metrics read (which resets the router statistics)."""
    losses = [_step(model, opt, x) for x in batches]
    model.eval()
    with torch.no_grad():
        losses.append(float(model(batches[0][:, :-1], batches[0][:, 1:]).loss))
    model.train()
    layers = {i: b.ffn for i, b in enumerate(model.blocks) if hasattr(b.ffn, "stats")}
    return losses, router_metrics(layers)


# one worker runs the three in turn: they share the kernels inductor compiles and caches on disk (attention,
# norms, SwiGLU), which a cold cache (a fresh CI machine) otherwise compiles in three workers at once
@pytest.mark.xdist_group("compile")
@pytest.mark.parametrize("overrides", [
    [],
    # capacity: the kept-row count is data dependent (a graph break at the routing index), and
    # evaluation runs at another capacity
    ["model.moe.router=switch", "model.moe.top_k=1", "model.moe.capacity_factor=1.25",
     "model.moe.eval_capacity_factor=2.0"],
    ["model.moe.router=expert_choice", "model.moe.capacity_factor=1.0"],
], ids=["dropless", "capacity", "expert_choice"])
def test_compiled_blocks_train_like_eager_and_compile_once(overrides):
    """train.compile: every block compiled in place (same parameter names), the same losses and router
    statistics as eager, and after a first round (training, evaluation, a metrics reset) no recompile."""
    torch.manual_seed(0)
    eager = GPT(_tiny(overrides))
    compiled = copy.deepcopy(eager)
    names = [n for n, _ in compiled.named_parameters()]
    apply_compile(compiled)
    assert [n for n, _ in compiled.named_parameters()] == names
    assert all(b._compiled_call_impl is not None for b in compiled.blocks)
    opts = {m: torch.optim.AdamW(m.parameters(), lr=3e-3) for m in (eager, compiled)}
    g = torch.Generator().manual_seed(1)
    rounds = [[torch.randint(0, 61, (4, 17), generator=g) for _ in range(2)] for _ in range(3)]
    torch._dynamo.reset()
    counters.clear()
    for i, batches in enumerate(rounds):
        with torch._dynamo.config.patch(error_on_recompile=i > 0):
            got, got_metrics = _round(compiled, opts[compiled], batches)
        want, want_metrics = _round(eager, opts[eager], batches)
        assert got == pytest.approx(want, rel=1e-4, abs=1e-5)
        assert got_metrics.keys() == want_metrics.keys()
        for key, value in want_metrics.items():
            assert got_metrics[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    assert counters["stats"]["unique_graphs"] > 0


def test_lr_warms_up_then_decays_to_the_floor():
    assert [lr_lambda(s, 4, 20, 0.1) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_lambda(4, 4, 20, 0.1) == pytest.approx(1.0)
    assert lr_lambda(12, 4, 20, 0.1) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_lambda(20, 4, 20, 0.1) == pytest.approx(0.1) and lr_lambda(50, 4, 20, 0.1) == pytest.approx(0.1)
    assert lr_lambda(0, 0, 10, 0.0) == pytest.approx(1.0)


def test_dtype():
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda", 0)) == torch.bfloat16
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    assert resolve_dtype("fp32", torch.device("cuda", 0)) == torch.float32


def test_weight_decay_on_matrices_only_and_experts_in_moe_groups():
    torch.manual_seed(0)
    model = GPT(_tiny([]))
    groups = optimizer_param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    by_name = {g["name"]: [names[id(p)] for p in g["params"]] for g in groups}
    assert set(by_name) == {"decay", "no_decay"}  # no expert parallelism: no MoE group
    assert all(not n.endswith(("embed.weight", "norm.weight", "bias")) for n in by_name["decay"])
    assert any(n.endswith("embed.weight") for n in by_name["no_decay"])
    assert sorted(sum(by_name.values(), [])) == sorted(names.values())
    assert {g["name"]: g["weight_decay"] for g in groups} == {"decay": 0.1, "no_decay": 0.0}
    for layer in model.moe_layers():
        for p in (layer.experts.w13, layer.experts.w2):
            ds.mark_expert_param(p, "ep_size_2")
    groups = optimizer_param_groups(model, 0.1)
    moe = [g for g in groups if g.get("moe")]
    assert moe and all(names[id(p)].split(".")[-1] in ("w13", "w2") for g in moe for p in g["params"])


def test_deepspeed_config():
    t = load_config(None, ["train.micro_batch_size=3", "train.grad_clip=0.5", "train.zero_stage=1"]).train
    cfg = deepspeed_config(t, grad_accum=2, dtype=torch.bfloat16)
    assert cfg["train_micro_batch_size_per_gpu"] == 3 and cfg["gradient_accumulation_steps"] == 2
    assert cfg["gradient_clipping"] == 0.5 and cfg["zero_optimization"] == {"stage": 1}
    assert cfg["bf16"] == {"enabled": True}
    assert deepspeed_config(t, 1, torch.float32)["bf16"] == {"enabled": False}


def test_materialize_model_initialises_from_the_seed_or_calls_the_loader():
    """A meta-built model is allocated and given the seeded init (the same at every call), or handed to
    `load_weights` instead (the hook for loading weights); a model on a device is left alone."""
    cfg = _tiny([])
    models = []
    for _ in range(2):
        with torch.device("meta"):
            models.append(GPT(cfg))
        materialize_model(models[-1], torch.device("cpu"), seed=3)
    assert torch.equal(models[0].blocks[1].ffn.experts.w13, models[1].blocks[1].ffn.experts.w13)
    with torch.device("meta"):
        loaded = GPT(cfg)
    seen = []
    materialize_model(loaded, torch.device("cpu"), seed=3,
                      load_weights=lambda m: seen.append(all(not p.is_meta for p in m.parameters())))
    assert seen == [True]
    before = models[0].embed.weight.clone()
    materialize_model(models[0], torch.device("cpu"), seed=4)
    assert torch.equal(models[0].embed.weight, before)
