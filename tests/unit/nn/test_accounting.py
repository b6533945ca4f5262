from moe.config import load_config
from moe.nn.accounting import count_params, flops_per_token
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
