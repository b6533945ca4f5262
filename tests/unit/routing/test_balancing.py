"""Auxiliary-loss-free balancing (the selection bias) and the step-level statistics."""
import os

import pytest
import torch
from torch import nn

from moe.routing.balancing import end_optimizer_step
from tests.helpers import layer, router

BIAS = ("model.moe.bias_update_rate=0.1", "model.moe.aux_loss_coef=0", "model.moe.z_loss_coef=0")


def test_bias_update_hand_computed():
    r = router(*BIAS)
    r.end_step(torch.tensor([10.0, 2.0, 4.0, 4.0]))  # mean 5: over, under, under, under
    torch.testing.assert_close(r.expert_bias, torch.tensor([-0.1, 0.1, 0.1, 0.1]))
    r.end_step(torch.tensor([5.0, 5.0, 6.0, 4.0]))  # mean 5: equal ones stay
    torch.testing.assert_close(r.expert_bias, torch.tensor([-0.1, 0.1, 0.0, 0.2]))


def test_bias_changes_selection_never_gate_weights():
    torch.manual_seed(0)
    for score_func in ("softmax", "sigmoid"):
        r = router(*BIAS, f"model.moe.score_func={score_func}", "model.moe.top_k=2", d=8)
        x = torch.randn(200, 8)
        before = r(x)
        with torch.no_grad():
            r.expert_bias.copy_(torch.tensor([5.0, 0.0, 0.0, 0.0]))  # expert 0 always selected
        after = r(x)
        assert (after.expert_indices == 0).any(-1).all()
        assert not torch.equal(before.expert_indices, after.expert_indices)
        torch.testing.assert_close(after.scores, before.scores)  # scores carry no bias
        # the gates are the unbiased scores of whatever was selected
        torch.testing.assert_close(after.gate_weights, r.gates(after.scores.gather(1, after.expert_indices)))
        same = (before.expert_indices == after.expert_indices).all(-1)
        assert same.any()
        torch.testing.assert_close(after.gate_weights[same], before.gate_weights[same])


def test_step_load_accumulates_over_micro_batches_and_resets():
    torch.manual_seed(0)
    r = router(*BIAS, "model.moe.global_aux_loss_coef=0.01")
    xs = [torch.randn(16, 4) for _ in range(3)]
    total = sum(torch.bincount(r(x).expert_indices.reshape(-1), minlength=4) for x in xs)
    assert torch.equal(r.step_load, total)
    model = nn.Sequential(r)
    end_optimizer_step(model)
    assert int(r.step_load.sum()) == 0
    torch.testing.assert_close(r.global_load, total.float() / total.sum())
    r.eval()
    r(xs[0])
    assert int(r.step_load.sum()) == 0  # eval forwards do not count


def test_bias_and_global_load_are_buffers_in_the_state_dict():
    r = router(*BIAS, "model.moe.global_aux_loss_coef=0.01")
    sd = r.state_dict()
    assert "expert_bias" in sd and "global_load" in sd and "step_load" not in sd
    assert "expert_bias" not in router().state_dict()  # off: old checkpoints still load


def test_bias_stays_fp32_under_mixed_precision():
    m = layer(*BIAS).to(torch.bfloat16)
    assert m.router.expert_bias.dtype == torch.bfloat16
    m(torch.randn(2, 4, 16, dtype=torch.bfloat16))
    assert m.router.expert_bias.dtype == torch.float32
    m.router.end_step(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    m.router.end_step(torch.tensor([1.0, 2.0, 3.0, 4.0]) * 1000)
    torch.testing.assert_close(m.router.expert_bias, torch.tensor([0.2, 0.2, -0.2, -0.2]))


def test_bias_balances_a_skewed_router():
    """The sign rule alone (no loss, no gradient) evens out an imbalanced router."""
    torch.manual_seed(0)
    r = router("model.moe.bias_update_rate=0.001", "model.moe.aux_loss_coef=0", "model.moe.top_k=1", d=8)
    with torch.no_grad():
        r.weight.mul_(50)  # logits of order 1
    x = torch.randn(512, 8)
    model = nn.Sequential(r)
    history = []
    for _ in range(400):
        counts = torch.bincount(r(x).expert_indices.reshape(-1), minlength=4).float()
        history.append(float(counts.max() / counts.mean()))
        end_optimizer_step(model)
    assert history[0] > 1.5 and history[-1] < 1.05


def _two_rank_worker(rank, init_file, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    r = router(*BIAS, "model.moe.global_aux_loss_coef=0.01")
    r.step_load.copy_(torch.tensor([[6, 0, 1, 1], [0, 2, 3, 3]])[rank])  # sum: [6, 2, 4, 4], mean 4
    end_optimizer_step(nn.Sequential(r))
    torch.save({"bias": r.expert_bias, "global_load": r.global_load}, os.path.join(out_dir, f"{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.distributed
def test_step_load_is_summed_over_data_parallel_ranks(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_two_rank_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    results = [torch.load(tmp_path / f"{rank}.pt") for rank in (0, 1)]
    for res in results:
        torch.testing.assert_close(res["bias"], torch.tensor([-0.1, 0.1, 0.0, 0.0]))
        torch.testing.assert_close(res["global_load"], torch.tensor([6.0, 2.0, 4.0, 4.0]) / 16)
