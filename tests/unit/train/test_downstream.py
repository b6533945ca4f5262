"""moe/train/downstream.py without lm-eval: the scoring, generation and result pieces of the adapter,
each against the model's own full forward (lm-eval's Hugging Face model is the reference for the
adapter as a whole: tests/integration/test_downstream.py)."""
import pytest
import torch
import torch.nn.functional as F

from moe.config import ConfigError
from moe.errors import DataError
from moe.nn.gpt import GPT
from moe.train.downstream import cut_at_stops, generate, metric_record, score, task_metrics
from tests.helpers import tiny_gpt_config


def tiny_model(*overrides):
    """max_seq_len 32, vocabulary 97; init_std 0.2 so that the logits depend on more than the last token."""
    torch.manual_seed(0)
    return GPT(tiny_gpt_config("model.init_std=0.2", *overrides).model).eval()


def reference(model, context, continuation, max_len=32):
    """Sum of log p(continuation token | everything before it), from one unbatched forward of the last
    max_len + 1 tokens, and whether each continuation token is the argmax."""
    ids = (context + continuation)[-(max_len + 1):]
    with torch.no_grad():
        logp = F.log_softmax(model(torch.tensor([ids[:-1]])).logits[0].float(), -1)
    rows = logp[len(ids) - 1 - len(continuation):]
    target = torch.tensor(continuation)
    return float(rows.gather(1, target[:, None]).sum()), bool((rows.argmax(-1) == target).all())


@pytest.mark.parametrize("overrides", [(), ("model.moe.num_experts=4", "model.moe.top_k=2", "model.moe.expert_hidden=32")],
                         ids=["dense", "moe"])
def test_batched_padded_scores_equal_one_forward_per_pair(overrides):
    model = tiny_model(*overrides)
    g = torch.Generator().manual_seed(1)
    pairs = [(torch.randint(0, 97, (n,), generator=g).tolist(), torch.randint(0, 97, (m,), generator=g).tolist())
             for n, m in [(3, 1), (10, 4), (1, 1), (20, 12), (6, 2)]]
    pairs.append((pairs[1][0], pairs[1][0][:3]))  # a continuation the model may well predict
    pairs.append(([5] * 30, [7, 8, 9, 10, 11]))  # 35 tokens > 33: the oldest context tokens are cut
    got = score(model, pairs, max_len=32, batch_size=3)
    for (ctx, cont), (lp, greedy) in zip(pairs, got):
        want_lp, want_greedy = reference(model, ctx, cont)
        assert lp == pytest.approx(want_lp, abs=1e-4) and greedy == want_greedy
    assert all(lp < 0 for lp, _ in got)


@pytest.mark.parametrize("n", [0, 33])
def test_a_continuation_must_fit_the_window(n):
    with pytest.raises(DataError, match=f"a continuation of {n} tokens"):
        score(tiny_model(), [([1, 2], [3] * n)], max_len=32)


def test_a_greedy_continuation_is_flagged_greedy():
    model = tiny_model()
    ctx = [4, 8, 15, 16, 23, 42]
    cont = argmax_continuation(model, ctx, 3)
    assert score(model, [(ctx, cont)], 32) == [(pytest.approx(reference(model, ctx, cont)[0], abs=1e-4), True)]


def argmax_continuation(model, prompt, n):
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            tokens.append(int(model(torch.tensor([tokens[-32:]])).logits[0, -1].argmax()))
    return tokens[len(prompt):]


def test_greedy_generation_with_the_kv_cache_is_the_argmax_continuation():
    model = tiny_model()
    prompt = [5, 17, 42, 8, 3]
    want = argmax_continuation(model, prompt, 10)
    assert generate(model, model.cfg, prompt, 10) == want
    assert generate(model, model.cfg, prompt, 10, stop_id=want[4]) == want[:want.index(want[4]) + 1]
    assert generate(model, model.cfg, prompt, 10, done=lambda new: len(new) == 3) == want[:3]
    long = [(7 * i) % 97 for i in range(40)]  # keeps the last max_seq_len - max_new tokens
    assert generate(model, model.cfg, long, 4) == argmax_continuation(model, long[-28:], 4)


def test_sampling_is_reproducible_and_bounded():
    model = tiny_model()
    a = generate(model, model.cfg, [1, 2, 3], 12, temperature=1.0, seed=3)
    assert a == generate(model, model.cfg, [1, 2, 3], 12, temperature=1.0, seed=3) and len(a) == 12
    assert len({tuple(generate(model, model.cfg, [1, 2, 3], 12, temperature=1.0, seed=s)) for s in range(4)}) > 1


@pytest.mark.parametrize("max_new", [0, 32])
def test_max_gen_toks_must_leave_room_for_the_prompt(max_new):
    model = tiny_model()
    with pytest.raises(ConfigError, match=f"max_gen_toks={max_new}"):
        generate(model, model.cfg, [1, 2], max_new)


def test_cut_at_stops():
    assert cut_at_stops("x)\nprint(y)", ["\n"]) == "x)"
    assert cut_at_stops("abc;def\nghi", ["\n", ";"]) == "abc"
    assert cut_at_stops("abc", ["", "z"]) == "abc"


def test_task_metrics_and_record():
    results = {"mc": {"alias": "mc", "acc,none": 0.5, "acc_stderr,none": "N/A", "acc_norm,none": 0.25,
                      "sample_len": 8},
               "gen": {"exact_match,strict-match": 1.0, "exact_match,none": 0.0},
               "group": {"alias": "group"}}
    metrics = task_metrics(results)
    assert metrics == {"mc": {"acc": 0.5, "acc_norm": 0.25},
                       "gen": {"exact_match_strict-match": 1.0, "exact_match": 0.0}}
    assert metric_record({**metrics, "ppl": {"word_perplexity": float("inf")}}) == {
        "downstream/mc/acc": 0.5, "downstream/mc/acc_norm": 0.25, "downstream/gen/exact_match_strict-match": 1.0,
        "downstream/gen/exact_match": 0.0}
