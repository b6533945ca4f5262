"""Activation recompute: the gradients, losses and router statistics of `none`, counted once; routing noise
drawn again identically; parameter names unchanged."""
import copy

import pytest
import torch
from torch.utils.checkpoint import set_checkpoint_early_stop

from moe.nn.gpt import GPT
from moe.parallel.recompute import apply_recompute
from tests.helpers import tiny_gpt_config

MOE = ("model.moe.num_experts=4", "model.moe.top_k=2", "model.moe.aux_loss_coef=0.01",
       "model.moe.z_loss_coef=0.001", "model.moe.bias_update_rate=0.001", "model.moe.global_aux_loss_coef=0.01")
NOISY = ("model.moe.noisy_gating=true", "model.moe.jitter_eps=0.05", "model.moe.random_routing=true")


def run(model, idx, seed=5):
    """One training forward/backward from a fixed RNG state: (loss, aux, grads, stats, step loads)."""
    torch.manual_seed(seed)
    out = model(idx, targets=idx)
    (out.loss + out.aux_loss).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    stats = [layer.stats.packed.clone() for layer in model.moe_layers()]
    loads = [layer.router.step_load.clone() for layer in model.moe_layers() if layer.router.step_load is not None]
    return out.loss.detach(), out.aux_loss.detach(), grads, stats, loads, torch.rand(3)


def pair(mode, *overrides):
    torch.manual_seed(0)
    cfg = tiny_gpt_config(*overrides).model
    ref = GPT(cfg)
    other = copy.deepcopy(ref)
    apply_recompute(other, mode)
    return ref, other


@pytest.mark.parametrize("mode,overrides", [
    ("full", ()), ("moe", MOE + NOISY), ("full", MOE + NOISY),
    ("full", MOE + ("model.moe.router=expert_choice", "model.moe.bias_update_rate=0"))],
    ids=["dense-full", "moe-noisy-moe", "moe-noisy-full", "expert-choice-full"])
def test_recompute_equals_none(mode, overrides):
    """Gradients, losses, RouterStats (packed: counts, entropy, calls, logged losses), the router's step
    load and the RNG stream after the step are those without recompute: counted once, same noise."""
    ref, other = pair(mode, *overrides)
    idx = torch.randint(0, 97, (2, 16))
    a, b = run(ref, idx), run(other, idx)
    torch.testing.assert_close(b[0], a[0], rtol=0, atol=0)
    torch.testing.assert_close(b[1], a[1], rtol=0, atol=0)
    assert b[2].keys() == a[2].keys() and len(a[2]) == len(list(ref.parameters()))
    for name in a[2]:
        torch.testing.assert_close(b[2][name], a[2][name], rtol=1e-6, atol=1e-7, msg=name)
    for sa, sb in zip(a[3], b[3]):
        torch.testing.assert_close(sb, sa, rtol=0, atol=0)
    for la, lb in zip(a[4], b[4]):
        torch.testing.assert_close(lb, la, rtol=0, atol=0)
    torch.testing.assert_close(b[5], a[5])  # the recompute left the global RNG where the forward left it


@pytest.mark.parametrize("early_stop", [True, False])
def test_recompute_counts_each_micro_batch_once_across_accumulation(early_stop):
    """Two micro-batches: stats `calls` is 2 per layer (not 3 or 4), as without recompute, whether the
    recomputation stops after the last saved tensor (torch's default) or runs the whole block."""
    _, model = pair("full", *MOE)
    for seed in (1, 2):
        with set_checkpoint_early_stop(early_stop):
            run(model, torch.randint(0, 97, (2, 16)), seed)
    for layer in model.moe_layers():
        assert float(layer.stats.calls) == 2
        assert int(layer.router.step_load.sum()) == 2 * 2 * 16 * 2  # micro-batches x tokens x top_k


def test_recompute_frees_activations():
    """Saved activations of the graph shrink: full < moe < none (bytes saved for backward)."""
    sizes = {}
    for mode in ("none", "moe", "full"):
        torch.manual_seed(0)
        model = GPT(tiny_gpt_config(*MOE, "model.moe.expert_hidden=256").model)
        apply_recompute(model, mode)
        saved = []

        def pack(t, saved=saved):
            saved.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(torch.randint(0, 97, (4, 32)), targets=torch.randint(0, 97, (4, 32))).loss.backward()
        sizes[mode] = sum(saved)
    assert sizes["full"] < sizes["moe"] < sizes["none"]


def test_names_state_dict_and_eval_unchanged():
    ref, other = pair("full", *MOE)
    assert [n for n, _ in other.named_parameters()] == [n for n, _ in ref.named_parameters()]
    assert other.state_dict().keys() == ref.state_dict().keys()
    ref.eval(), other.eval()
    idx = torch.randint(0, 97, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(other(idx).logits, ref(idx).logits, rtol=0, atol=0)


def test_unknown_mode_is_rejected():
    with pytest.raises(ValueError, match="train.recompute"):
        apply_recompute(GPT(tiny_gpt_config().model), "blocks")


def test_per_source_expert_counts_are_counted_once():
    """RouterStats.domain (the expert counts per data source of a mixture) under full recompute, with the
    recomputation running to the block's end (without early stop, RouterStats.update runs again too)."""
    counts, idx = [], torch.randint(0, 97, (2, 16))
    for model in pair("full", *MOE):
        for layer in model.moe_layers():
            layer.stats.token_sources, layer.stats.num_sources = torch.arange(32) % 2, 2
        with set_checkpoint_early_stop(False):
            run(model, idx)
        counts.append([layer.stats.domain.clone() for layer in model.moe_layers()])
    assert float(counts[0][0].sum()) == 2 * 16 * 2
    for a, b in zip(*counts):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
