import torch
import torch.nn.functional as F

from moe.nn.ffn import DenseFFN, swiglu


def test_swiglu_is_silu_of_the_gate_times_the_up_half():
    h13 = torch.randn(3, 5, 8)
    gate, up = h13[..., :4], h13[..., 4:]
    torch.testing.assert_close(swiglu(h13), F.silu(gate) * up, rtol=0, atol=0)


def test_dense_ffn_computes_w2_of_swiglu_of_w13():
    torch.manual_seed(0)
    ffn = DenseFFN(6, 10, 0.02, 0.01)
    assert [k for k in ffn.state_dict()] == ["w13.weight", "w2.weight"]  # checkpoint keys
    assert ffn.w13.weight.shape == (20, 6) and ffn.w2.weight.shape == (6, 10)
    x = torch.randn(2, 3, 6)
    want = swiglu(x @ ffn.w13.weight.t()) @ ffn.w2.weight.t()
    torch.testing.assert_close(ffn(x), want)
    torch.testing.assert_close(ffn(x, token_ids=torch.zeros(2, 3, dtype=torch.long)), want)  # ids unused


def test_dense_ffn_init_stds():
    torch.manual_seed(0)
    ffn = DenseFFN(256, 512, 0.02, 0.005)
    assert abs(ffn.w13.weight.std().item() - 0.02) < 1e-3
    assert abs(ffn.w2.weight.std().item() - 0.005) < 1e-3
