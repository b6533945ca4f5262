"""moe/parallel/__init__.py: what is applied to the model from outside it (here: torch.compile, `train.compile`).
Expert parallelism and the DeepSpeed engine are covered end to end in test_expert_parallel.py and
test_train.py."""
import copy

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from moe.config import load_config
from moe.metrics import router_metrics
from moe.nn.gpt import GPT
from moe.parallel import apply_compile


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
