import pytest
import torch

from moe.config import load_config
from moe.nn.accounting import activation_bytes_per_token, count_params, flops_per_token, param_counts
from moe.nn.gpt import GPT
from tests.helpers import tiny_gpt_config


def test_param_and_flop_accounting_equal_active():
    """The quickstart pair: 8 experts of 256 top-2 vs dense 512 have equal active FFN size."""
    base = ["model.vocab_size=257", "model.d_model=128", "model.n_layers=4", "model.ffn_hidden=512"]
    dense_cfg = load_config(None, base).model
    moe_cfg = load_config(None, base + ["model.moe.num_experts=8", "model.moe.expert_hidden=256"]).model
    dense, moe = count_params(GPT(dense_cfg)), count_params(GPT(moe_cfg))
    assert dense["params_total"] == dense["params_active"]
    router = 4 * 8 * 128
    assert moe["params_active"] == dense["params_active"] + router
    expert = 3 * 128 * 256
    assert moe["params_total"] == moe["params_active"] + 4 * 6 * expert
    fd, fm = flops_per_token(dense_cfg, 256)["flops_per_token"], flops_per_token(moe_cfg, 256)["flops_per_token"]
    assert fm - fd == 3 * 2 * router  # only the router differs


def test_shared_experts_count_as_active():
    cfg = tiny_gpt_config("model.moe.num_experts=4", "model.moe.top_k=1", "model.moe.num_shared_experts=2",
                          "model.moe.expert_hidden=16").model
    p = count_params(GPT(cfg))
    per_expert = 3 * 32 * 16
    routed_inactive = 2 * 3 * per_expert  # 2 layers, 3 of 4 experts idle
    assert p["params_total"] - p["params_active"] == routed_inactive


def test_flops_of_a_dense_model_by_hand():
    """Forward FLOPs of the tiny dense model counted by hand; training = 3x forward."""
    cfg = tiny_gpt_config().model  # d 32, 2 layers, FFN 64, vocabulary 97
    d, S = 32, 16
    per_layer = 2 * 4 * d * d + 2 * 2 * d * (S / 2) + 2 * 3 * d * 64
    fwd = 2 * per_layer + 2 * d * 97
    assert flops_per_token(cfg, S) == {"flops_per_token": 3 * fwd, "flops_per_token_forward": fwd}


# ---- activations: the bytes the forward saves for backward, against what autograd actually saves


def _saved_bytes(model, tokens, dtype):
    """Bytes of the distinct storages autograd saves in one training forward (parameters and buffers
    excluded), plus the logits the step keeps: counted with saved_tensors_hooks, independently of the formula."""
    own = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in own:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            out = model(tokens, tokens)
    return sum(seen.values()) + out.logits.numel() * out.logits.element_size()


F32, BF16 = torch.float32, torch.bfloat16


@pytest.mark.parametrize("overrides,dtype", [
    ([], F32), (["model.moe.num_experts=0"], BF16),
    (["model.qk_norm=proj", "model.n_kv_heads=1"], F32), (["model.qk_norm=proj", "model.n_kv_heads=1"], BF16),
    (["model.head_dim=24", "model.qk_norm=head", "model.moe.num_shared_experts=2", "model.moe.moe_every=2"], F32),
    (["model.head_dim=24", "model.qk_norm=head", "model.moe.num_shared_experts=2", "model.moe.moe_every=2"], BF16),
], ids=lambda v: str(v).replace("torch.", "") if isinstance(v, torch.dtype) else ",".join(v) or "moe")
def test_activation_bytes_equal_what_autograd_saves(overrides, dtype):
    """fp32 (CPU training) and bf16 autocast over bf16 weights (GPU training): the formula is what the
    model saves, to the few E-sized router tensors per layer it leaves out."""
    cfg = tiny_gpt_config("model.moe.num_experts=4", "model.moe.expert_hidden=48", *overrides).model
    torch.manual_seed(0)
    model = GPT(cfg).to(dtype)
    B, S = 4, 32
    measured = _saved_bytes(model, torch.randint(0, cfg.vocab_size, (B, S)), dtype)
    per_token = activation_bytes_per_token(cfg, dtype.itemsize, device="cpu")
    assert per_token["block_max"] == 0  # nothing is recomputed
    predicted = B * S * (per_token["layers"] + per_token["head"])
    assert abs(predicted - measured) <= 0.005 * measured, (predicted, measured)


def test_recompute_keeps_less_and_full_keeps_block_inputs():
    cfg = tiny_gpt_config("model.moe.num_experts=4", "model.moe.expert_hidden=48", "model.moe.top_k=2").model
    none, moe, full = (activation_bytes_per_token(cfg, 2, recompute=r) for r in ("none", "moe", "full"))
    assert full["layers"] < moe["layers"] < none["layers"]
    assert full["layers"] == cfg.n_layers * cfg.d_model * 2  # each block's input
    assert full["block_max"] == none["layers"] / cfg.n_layers  # one block recomputed at a time (all alike here)
    assert none["head"] == moe["head"] == full["head"]


def test_param_counts_split_the_routed_experts():
    cfg = tiny_gpt_config("model.moe.num_experts=4", "model.moe.expert_hidden=16", "model.moe.num_shared_experts=1").model
    counts = param_counts(cfg)
    model = GPT(cfg)
    assert counts["params_total"] == sum(p.numel() for p in model.parameters())
    assert counts["params_expert"] == sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
