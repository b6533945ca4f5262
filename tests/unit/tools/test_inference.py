"""moe/tools/inference.py: `moe generate` and `moe eval` without DeepSpeed. The sampling flags are
checked (naming the flag) before a run is opened; load_run refuses a folder that is not a run or has
no checkpoint, naming it; generation with the KV cache is the model's own argmax continuation at
temperature 0 and reproducible per seed; evaluate_dataset is the model's token-weighted mean loss."""
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

from moe.cli import main
from moe.config import ConfigError, to_yaml
from moe.data import ByteTokenizer
from moe.errors import CheckpointError, CheckpointNotFound
from moe.nn.gpt import GPT
from moe.tools.inference import MIN_TEMPERATURE, check_sampling_args, evaluate_dataset, generate, load_run, sample_token

from tests.helpers import pattern_dataset, tiny_gpt_config

SAMPLING = {"prompt": "def ", "max_new_tokens": 10, "temperature": 0.8, "top_k": 0, "top_p": 0.95, "seed": 0}


@pytest.fixture(autouse=True)
def no_debug(monkeypatch):
    monkeypatch.delenv("MOE_DEBUG", raising=False)


def tiny_model(*overrides, seed=0):
    """A tiny GPT in eval mode. init_std 0.2: at the default 0.02 its next token hardly depends on more than
    the last one, and a KV cache that mixed up positions would go unseen."""
    torch.manual_seed(seed)
    return GPT(tiny_gpt_config("model.init_std=0.2", *overrides).model).eval()


# ------------------------------------------------------ `moe generate` flags, checked and reported like keys


@pytest.mark.parametrize("kwargs,flag", [
    ({"prompt": ""}, "--prompt"),
    ({"max_new_tokens": 0}, "--max-new-tokens"),
    ({"max_new_tokens": -5}, "--max-new-tokens"),
    ({"temperature": float("nan")}, "--temperature"),
    ({"temperature": float("inf")}, "--temperature"),
    ({"temperature": -0.5}, "--temperature"),
    ({"temperature": 1e-30}, "--temperature"),
    ({"top_p": 0.0}, "--top-p"),
    ({"top_p": 1.5}, "--top-p"),
    ({"top_p": float("nan")}, "--top-p"),
    ({"top_k": -1}, "--top-k"),
    ({"seed": -1}, "--seed"),
    ({"seed": 2**64}, "--seed"),
])
def test_sampling_flags_are_checked(kwargs, flag):
    check_sampling_args(**SAMPLING)
    check_sampling_args(**{**SAMPLING, "temperature": 0.0, "top_p": 1.0, "top_k": 5})
    check_sampling_args(**{**SAMPLING, "temperature": MIN_TEMPERATURE, "seed": 2**64 - 1})
    with pytest.raises(ConfigError, match=f"^{flag} must"):
        check_sampling_args(**{**SAMPLING, **kwargs})


def test_generate_flags_fail_before_the_run_is_opened(tmp_path, monkeypatch, capsys):
    """The run folder does not exist: an error about a flag means no model was loaded first; nothing is
    written."""
    monkeypatch.chdir(tmp_path)
    missing = str(tmp_path / "no_such_run")
    for flags, flag in [(["--prompt", ""], "--prompt"), (["--prompt", "x", "--top-p", "2"], "--top-p"),
                        (["--prompt", "x", "--max-new-tokens", "-1"], "--max-new-tokens"),
                        (["--prompt", "x", "--temperature", "nan"], "--temperature")]:
        with pytest.raises(SystemExit) as info:
            main(["generate", missing, *flags])
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {flag} must") and err.count("\n") == 1, err
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------------------------------ load_run


def run_folder(tmp_path, name="run"):
    d = tmp_path / name
    d.mkdir()
    (d / "config.yaml").write_text(to_yaml(tiny_gpt_config()))
    return d


@pytest.mark.parametrize("make", ["missing", "empty"])
def test_load_run_of_a_folder_that_is_not_a_run(tmp_path, make):
    d = tmp_path / "runs" / "x"
    if make == "empty":
        d.mkdir(parents=True)
    with pytest.raises(FileNotFoundError) as info:
        load_run(str(d))
    assert str(info.value) == f"{d}: not a run folder (no config.yaml)"


@pytest.mark.parametrize("with_folder", [False, True])
def test_load_run_without_a_checkpoint(tmp_path, with_folder):
    d = run_folder(tmp_path)
    if with_folder:
        (d / "checkpoints").mkdir()
    with pytest.raises(FileNotFoundError) as info:
        load_run(str(d))
    assert str(info.value) == f"{d}: no checkpoint yet (nothing in {d / 'checkpoints'})"


def test_load_run_whose_checkpoints_vanished(tmp_path):
    d = run_folder(tmp_path)
    (d / "checkpoints").mkdir()
    (d / "checkpoints" / "latest").write_text("step_00000004")
    with pytest.raises(CheckpointError, match=r"the checkpoints are gone") as info:
        load_run(str(d))
    assert str(d / "checkpoints") in str(info.value)


def test_load_run_of_a_tag_that_is_not_there(tmp_path):
    d = run_folder(tmp_path)
    with pytest.raises(CheckpointNotFound) as info:
        load_run(str(d), tag="step_00000009")
    assert str(info.value) == f"{d / 'checkpoints' / 'step_00000009'}: not a checkpoint (no meta.json)"


def legacy_run(tmp_path, cfg, model, tag="step_00000003"):
    """A run folder with one checkpoint in DeepSpeed's own format (the model states file), the config it
    was trained with beside it, the run's byte tokenizer, and `latest` naming it."""
    d = tmp_path / "run"
    step = d / "checkpoints" / tag
    step.mkdir(parents=True)
    (d / "config.yaml").write_text(to_yaml(tiny_gpt_config("model.n_layers=4")))  # not what the weights need
    (step / "config.yaml").write_text(to_yaml(cfg))
    torch.save({"module": model.state_dict()}, step / "mp_rank_00_model_states.pt")
    (d / "checkpoints" / "latest").write_text(tag)
    ByteTokenizer().save(str(d))
    return d


def test_load_run_builds_the_model_of_the_checkpoints_own_config(tmp_path):
    cfg = tiny_gpt_config("model.vocab_size=257", f"data.cache_dir={tmp_path / 'cache'}")
    torch.manual_seed(1)
    saved = GPT(cfg.model)
    d = legacy_run(tmp_path, cfg, saved)
    model, tok, loaded_cfg = load_run(str(d))
    assert loaded_cfg.model == cfg.model and loaded_cfg.model.n_layers == 2
    assert not model.training and isinstance(tok, ByteTokenizer)
    state = model.state_dict()
    assert state.keys() == saved.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in saved.state_dict().items())


def test_load_run_names_a_bad_stored_config(tmp_path):
    cfg = tiny_gpt_config("model.vocab_size=257")
    d = legacy_run(tmp_path, cfg, GPT(cfg.model))
    cfg_file = d / "checkpoints" / "step_00000003" / "config.yaml"
    cfg_file.write_text("model:\n  no_such_key: 1\n")
    with pytest.raises(ConfigError, match="no_such_key") as info:
        load_run(str(d))
    assert str(info.value).startswith(f"{cfg_file}: ")


def test_generate_and_eval_commands_on_a_run(tmp_path, capsys):
    cfg = tiny_gpt_config("model.vocab_size=257", f"data.cache_dir={tmp_path / 'cache'}")
    torch.manual_seed(2)
    model = GPT(cfg.model).eval()
    d = legacy_run(tmp_path, cfg, model)
    main(["generate", str(d), "--prompt", "def f(", "--temperature", "0", "--max-new-tokens", "6"])
    tok = ByteTokenizer()
    expected = generate(model, tok.encode("def f("), 6, 0.0, eos_id=tok.eos_id)
    assert capsys.readouterr().out == "def f(" + tok.decode(expected) + "\n"

    text = tmp_path / "valid.txt"
    text.write_text("hello world, " * 20)
    main(["eval", str(d), "--data", str(text), "--seq-len", "16", "--batch-size", "4"])
    result = json.loads(capsys.readouterr().out)
    assert result["run"] == str(d) and result["data"] == str(text)
    assert result["tokens"] % 16 == 0 and result["tokens"] > 0
    assert result["ppl"] == pytest.approx(math.exp(result["loss"]))
    assert 0 < result["loss"] < 2 * math.log(257)


# ------------------------------------------------------------------------------------------ generate


def argmax_continuation(model, prompt, n):
    """Greedy decoding by hand: the whole sequence through the model (no cache) for every token."""
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            tokens.append(int(model(torch.tensor([tokens])).logits[0, -1].argmax()))
    return tokens[len(prompt):]


@pytest.mark.parametrize("overrides", [(), ("model.moe.num_experts=4", "model.moe.top_k=2", "model.moe.expert_hidden=32")],
                         ids=["dense", "moe"])
def test_greedy_generation_is_the_argmax_continuation(overrides):
    model = tiny_model(*overrides)
    prompt = [5, 17, 42, 8, 3]
    expected = argmax_continuation(model, prompt, 12)
    assert generate(model, prompt, 12, temperature=0.0) == expected
    assert generate(model, prompt, 12, temperature=0.0, seed=7) == expected  # greedy ignores the seed
    assert generate(model, prompt, 12, temperature=5.0, top_k=1, seed=3) == expected  # top-1 is greedy


def test_sampling_is_reproducible_per_seed():
    model = tiny_model()
    prompt = [1, 2, 3]
    runs = {seed: generate(model, prompt, 16, temperature=1.0, top_p=1.0, seed=seed) for seed in range(4)}
    assert runs[0] == generate(model, prompt, 16, temperature=1.0, top_p=1.0, seed=0)
    assert len({tuple(r) for r in runs.values()}) > 1
    assert all(len(r) == 16 and all(0 <= t < 97 for t in r) for r in runs.values())


def test_generation_stops_at_eos():
    model = tiny_model()
    prompt = [9, 9, 4]
    greedy = argmax_continuation(model, prompt, 8)
    eos = greedy[3]
    assert generate(model, prompt, 8, temperature=0.0, eos_id=eos) == greedy[:greedy.index(eos) + 1]


def test_generation_stays_within_max_seq_len():
    model = tiny_model()  # max_seq_len 32
    prompt = list(range(1, 31))
    assert generate(model, prompt, 10, temperature=0.0) == argmax_continuation(model, prompt, 2)
    long = [(7 * i) % 97 for i in range(40)]  # keeps the last max_seq_len - 1 tokens
    assert generate(model, long, 10, temperature=0.0) == argmax_continuation(model, long[-31:], 1)


def test_empty_prompt_ids_are_refused():
    with pytest.raises(ConfigError, match="--prompt encodes to no tokens"):
        generate(tiny_model(), [], 5)


def test_sample_token_filters():
    gen = torch.Generator().manual_seed(0)
    logits = torch.tensor([0.0, 3.0, 1.0, 2.9])
    assert sample_token(logits, 0.0, 0, 1.0, gen) == 1
    assert sample_token(logits, MIN_TEMPERATURE, 0, 1.0, gen) == 1  # tiny temperature: no NaN, the argmax
    assert {sample_token(logits, 1.0, 2, 1.0, gen) for _ in range(300)} == {1, 3}  # the two likeliest
    probs = torch.log(torch.tensor([0.5, 0.3, 0.2]))
    # top-p keeps the smallest set of likeliest tokens whose mass reaches p
    assert {sample_token(probs, 1.0, 0, 0.5, gen) for _ in range(200)} == {0}
    assert {sample_token(probs, 1.0, 0, 0.6, gen) for _ in range(300)} == {0, 1}


def test_sample_token_draws_the_softmax_distribution():
    gen = torch.Generator().manual_seed(0)
    logits = torch.log(torch.tensor([0.7, 0.2, 0.1]))
    draws = [sample_token(logits, 1.0, 0, 1.0, gen) for _ in range(4000)]
    freq = [draws.count(i) / len(draws) for i in range(3)]
    assert freq == pytest.approx([0.7, 0.2, 0.1], abs=0.03)
    # temperature 2 flattens: p ~ sqrt(p)
    draws = [sample_token(logits, 2.0, 0, 1.0, gen) for _ in range(4000)]
    flat = torch.tensor([0.7, 0.2, 0.1]).sqrt()
    assert [draws.count(i) / len(draws) for i in range(3)] == pytest.approx((flat / flat.sum()).tolist(), abs=0.03)


# ---------------------------------------------------------------------------------- evaluate_dataset


def mean_loss_by_hand(model, dataset, seq_len, windows):
    total = count = 0
    with torch.no_grad():
        for i in range(windows):
            seq = torch.from_numpy(dataset.sequence(i, seq_len))
            logits = model(seq[None, :-1]).logits[0]
            total += float(F.cross_entropy(logits.float(), seq[1:], reduction="sum"))
            count += seq_len
    return total / count, count


@pytest.mark.parametrize("overrides", [(), ("model.moe.num_experts=4", "model.moe.top_k=2", "model.moe.expert_hidden=32")],
                         ids=["dense", "moe"])
def test_evaluate_dataset_is_the_token_weighted_mean_loss(tmp_path, overrides):
    model = tiny_model("model.vocab_size=257", *overrides)
    dataset = pattern_dataset(tmp_path, 16 * 7 + 5)
    assert dataset.num_sequences(16) == 7
    loss, count = mean_loss_by_hand(model, dataset, 16, 7)
    result = evaluate_dataset(model, dataset, 16, batch_size=3)  # batches of 3, 3 and 1 windows
    assert result["tokens"] == count == 7 * 16
    assert result["loss"] == pytest.approx(loss, rel=1e-5)
    assert result["ppl"] == pytest.approx(math.exp(loss), rel=1e-5)


def test_evaluate_dataset_max_batches(tmp_path):
    model = tiny_model("model.vocab_size=257")
    dataset = pattern_dataset(tmp_path, 16 * 7 + 5)
    loss, count = mean_loss_by_hand(model, dataset, 16, 4)
    result = evaluate_dataset(model, dataset, 16, batch_size=2, max_batches=2)
    assert result["tokens"] == count == 4 * 16
    assert result["loss"] == pytest.approx(loss, rel=1e-5)


def test_evaluate_dataset_smaller_than_one_window(tmp_path):
    dataset = pattern_dataset(tmp_path, 10)
    with pytest.raises(ValueError) as info:
        evaluate_dataset(tiny_model("model.vocab_size=257"), dataset, 16)
    assert str(info.value) == f"the evaluation data has {dataset.num_tokens} tokens, fewer than one window of 17"


@pytest.mark.parametrize("flags, named", [
    (["--limit", "0"], "--limit must be > 0"),
    (["--limit", "nan"], "--limit must be > 0"),
    (["--num-fewshot", "-1"], "--num-fewshot must be >= 0"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--out", "."], "--out .: a folder"),
])
def test_eval_tasks_flags_fail_before_the_run_is_opened(tmp_path, monkeypatch, capsys, flags, named):
    monkeypatch.setattr("moe.tools.inference.load_run", lambda *a, **k: pytest.fail("the run was opened"))
    with pytest.raises(SystemExit) as exc:
        main(["eval", str(tmp_path), "--tasks", "arc_easy", *flags])
    assert exc.value.code == 2 and named in capsys.readouterr().err


def test_eval_takes_data_or_tasks_not_both(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["eval", str(tmp_path), "--data", "x.txt", "--tasks", "arc_easy"])
    assert "not allowed with argument" in capsys.readouterr().err
