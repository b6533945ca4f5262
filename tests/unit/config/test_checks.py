"""moe/config/checks.py: the config tree's own checks. A knob out of range, a size that would allocate
absurd memory, a name that cannot be a folder fails with one ConfigError line naming the key, before
anything is written; `check_fields` alone and the whole `validate()` report the same first error."""
import dataclasses
import os
import re
import typing

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moe.config import RANGES, Config, ConfigError, check_fields, load_config
from moe.validate import validate

from tests.helpers import ROOT, assert_refused_well, check_forward, listing
EXPERIMENTS = os.path.join(ROOT, "experiments")
MOE_YAML = os.path.join(EXPERIMENTS, "debug_moe.yaml")
CONFIGS = [os.path.join(EXPERIMENTS, name) for name in ("debug_moe.yaml", "debug_dense.yaml")]
SECRET = "zq9PLANTEDq9z"  # in files that must never be echoed


def error_of(overrides=(), path=MOE_YAML, world_size=1) -> str:
    """The one-line error of a config whose first fault is one of the config's own fields: the same
    from check_fields and from validate()."""
    cfg = load_config(path, list(overrides))
    with pytest.raises(ConfigError) as own:
        check_fields(cfg, world_size)
    with pytest.raises(ConfigError) as full:
        validate(cfg, world_size)
    message = str(own.value)
    assert str(full.value) == message
    assert "\n" not in message, message
    return message


def both_refuse(cfg, match, world_size=1):
    for check in (check_fields, validate):
        with pytest.raises(ConfigError, match=match) as info:
            check(cfg, world_size)
        assert "\n" not in str(info.value)


# ----------------------------------------------------------------------------------------- 1. ranges


@pytest.mark.parametrize("override", [
    "train.lr=inf", "train.lr=nan", "train.lr=-inf", "train.lr=0", "model.norm_eps=nan", "model.norm_eps=0",
    "model.rope_theta=0", "model.rope_theta=inf", "train.beta1=1.5", "train.beta1=1", "train.beta2=-0.1",
    "train.beta2=nan", "train.eps=-1e-8", "train.eps=0", "model.moe.capacity_factor=inf",
    "model.moe.eval_capacity_factor=nan", "model.init_std=-0.02", "model.init_std=nan", "model.max_seq_len=1e12",
    "model.max_seq_len=0", "train.min_lr_ratio=1.5", "train.min_lr_ratio=nan", "data.val_fraction=0",
    "data.val_fraction=1", "data.val_fraction=nan", "model.moe.jitter_eps=nan", "model.moe.jitter_eps=-0.1",
    "train.weight_decay=-0.1", "train.weight_decay=inf", "train.grad_clip=inf", "train.grad_clip=nan",
    "train.grad_clip=-1", "data.max_bytes=-1", "data.max_bytes=1e30", "model.vocab_size=-1",
    "model.vocab_size=100000000000", "model.d_model=1e9", "model.n_layers=100000", "model.n_heads=0",
    "parallel.timeout_s=0", "parallel.timeout_s=1e12", "train.steps=0", "train.steps=1e20",
    "train.warmup_steps=-1", "train.micro_batch_size=0", "train.eval_batches=0", "train.log_every=0",
    "train.threads=-1", "checkpoint.every=-1", "checkpoint.keep_last=0", "run.seed=-1", "run.seed=4294967296",
    "model.moe.aux_loss_coef=inf", "model.moe.z_loss_coef=nan", "model.moe.bias_update_rate=inf",
    "model.moe.min_capacity=-1", "model.moe.hash_seed=-1", "model.moe.sinkhorn_iters=1e9",
    "model.moe.num_shared_experts=1e9", "model.moe.top_k=0", "train.zero_stage=3",
    "data.bpe_vocab_size=-5", "model.ffn_hidden=1e12", "model.moe.expert_hidden=-1",
])
def test_out_of_range_knob_names_its_key(override):
    key = override.split("=")[0]
    assert error_of([override]).startswith(f"{key} must be ")


def test_every_numeric_field_has_a_range():
    """A new int or float field without a RANGES entry would skip the finite/range check."""
    numeric, lists = set(), set()

    def walk(cls, prefix):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            hint, key = hints[f.name], prefix + f.name
            if dataclasses.is_dataclass(hint):
                walk(hint, key + ".")
            elif hint in (int, float):
                numeric.add(key)
            elif "int" in str(hint) or "float" in str(hint):
                lists.add(key)

    walk(Config, "")
    assert numeric == set(RANGES)
    assert lists == {"model.moe.moe_layers"}  # its entries are checked against model.n_layers
    assert "model.moe.moe_layers" in error_of(["model.moe.moe_layers=[0,9]"])


def test_ranges_refuse_non_numbers_set_in_python():
    cfg = load_config(MOE_YAML)
    cfg.train.lr = "fast"
    both_refuse(cfg, r"^train\.lr must be > 0 and <= 10, got fast$")


@pytest.mark.parametrize("overrides,match", [
    # the RoPE tables (max_seq_len x head size floats) are allocated in every process
    (["model.d_model=4096", "model.n_heads=1", "model.max_seq_len=1048576", "train.seq_len=64"],
     r"^model\.max_seq_len \(1048576\) x head size \(4096\).*RoPE"),
    (["model.d_model=65536", "model.n_layers=1024", "model.n_heads=512"],
     r"^model: up to .* parameters.*model\.d_model"),
    (["model.vocab_size=16777216", "model.d_model=65536", "model.n_heads=512", "model.tie_embeddings=false"],
     r"^model: up to .* parameters"),
])
def test_sizes_that_would_allocate_absurd_memory(overrides, match):
    assert re.search(match, error_of(overrides))


def test_recompute_must_be_a_known_mode():
    assert re.search(r"^train\.recompute must be none, moe or full, got 'blocks'", error_of(["train.recompute=blocks"]))
    load_config(MOE_YAML, ["train.recompute=full"])  # a known one loads


TEXT_VALUES = ["0", "-1", "1", "2", "3", "8", "nan", "inf", "-inf", ".inf", "-.inf", ".nan", "1e12", "1e3", "1e-3",
               "1e-300", "1e400", "-1e400", "1.5", "0.5", "'1e12'", '"3"', "true", "null", "", "abc", "[1]", "[0,1]",
               "[1e0]", "[-1]", "{a: 1}", "0x10", "1_000", "${train.steps}", "${oc.env:NOPE_NOT_SET}", "???",
               str(2**63), str(2**64 + 1), str(-2**63 - 1)]
VALUES = st.one_of(st.floats(allow_nan=True, allow_infinity=True).map(repr), st.integers(-2**70, 2**70).map(str),
                   st.sampled_from(TEXT_VALUES))
NUMERIC_KEYS = sorted(RANGES) + ["model.moe.moe_layers"]
SETTINGS = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@SETTINGS
@given(base=st.sampled_from(CONFIGS), pairs=st.lists(st.tuples(st.sampled_from(NUMERIC_KEYS), VALUES), min_size=1,
                                                     max_size=3))
def test_any_numeric_override_is_accepted_or_refused_naming_its_key(empty_cwd, base, pairs):
    """Whatever a user types as a numeric knob, load_config + validate either accept it (and then a tiny
    model built from it gives finite losses) or raise one ConfigError line naming the key. No other
    exception escapes and nothing is written. Deterministic: derandomized, no example database."""
    overrides = [f"{k}={v}" for k, v in pairs]
    before = listing(empty_cwd)
    try:
        cfg = load_config(base, overrides)
        validate(cfg)
    except ConfigError as exc:
        assert_refused_well(exc, [k for k, _ in pairs], SECRET)
    else:
        check_forward(cfg)
    assert listing(empty_cwd) == before


# ----------------------------------------------------------------------------------- 2. cross-field


def test_batch_must_divide_world():
    assert "data-parallel size (2)" in error_of(["train.global_batch_size=12"], world_size=2)


def test_components_knobs_are_left_to_the_components():
    """check_fields checks only the tree itself: a router, expert backend or corpus name is the
    component's to know (moe.validate runs their checks), and a dense model ignores the MoE knobs."""
    for overrides in (["model.moe.router=nope"], ["model.moe.experts_impl=magic"], ["data.dataset=embedded:nope"],
                      ["model.moe.router=switch"]):
        cfg = load_config(MOE_YAML, overrides)
        check_fields(cfg)
        with pytest.raises(ConfigError, match=overrides[0].split("=")[0].replace(".", r"\.")):
            validate(cfg)
    dense = os.path.join(EXPERIMENTS, "debug_dense.yaml")
    check_fields(load_config(dense, ["model.moe.top_k=99", "model.moe.score_func=x", "model.moe.drop_policy=x"]))


# ----------------------------------------------------------------------------------------- 3. names


@pytest.mark.parametrize("name", ["..", ".", "", "a/b", "../escape", "a\\b", "a\0b", "-rf", "line\nbreak",
                                  "x" * 201, "é" * 101])
def test_run_name_must_be_a_plain_folder_name(name):
    cfg = load_config(MOE_YAML)
    cfg.run.name = name
    both_refuse(cfg, r"^run\.name must be a plain folder name: ")


def test_run_name_from_overrides_and_good_names():
    assert "run.name" in error_of(["run.name=.."])
    assert "run.name" in error_of(["run.name=../x"])
    for name in ("my-run_1.2", "top_k=1,aux_loss_coef=0.01", "x" * 200, "a b"):
        cfg = load_config(MOE_YAML, ["run.root=/any/path/../is/fine"])
        cfg.run.name = name
        check_fields(cfg)
        validate(cfg)


def write_sweep(tmp_path, text):
    path = tmp_path / "sweep.yaml"
    path.write_text(f"base: {MOE_YAML}\n{text}")
    return str(path)


@pytest.mark.parametrize("name", ["../escape", "..", "a/b", "-x", "x" * 201])
def test_sweep_name_must_be_a_plain_folder_name(tmp_path, name):
    from moe.tools.sweep import load_sweep

    path = write_sweep(tmp_path, f"name: '{name}'\ngrid:\n  model.moe.top_k: [1, 2]\n")
    with pytest.raises(ConfigError, match=r"sweep\.yaml: the sweep name must be a plain folder name"):
        load_sweep(path, runs_root=str(tmp_path / "runs"))
    assert sorted(os.listdir(tmp_path)) == ["sweep.yaml"]


def test_sweep_run_names_must_fit(tmp_path):
    from moe.tools.sweep import load_sweep

    path = write_sweep(tmp_path, "variants:\n  - {logging.wandb.project: " + "p" * 250 + "}\n")
    with pytest.raises(ConfigError, match=r"a run name must be a plain folder name: 'project=ppp.*bytes long"):
        load_sweep(path, runs_root=str(tmp_path / "runs"))


@pytest.mark.parametrize("overrides, named", [
    (["train.eval_tasks=[a,a]"], "train.eval_tasks: a task named twice"),
    (["train.eval_tasks=['a,b']"], "train.eval_tasks: 'a,b' is not a task name"),
    (["train.eval_tasks=['']"], "train.eval_tasks: '' is not a task name"),
    (["train.eval_include_path=no/such/folder"], "train.eval_include_path=no/such/folder: not a folder"),
    (["train.eval_tasks_limit=-1"], "train.eval_tasks_limit"),
])
def test_eval_tasks_are_checked(overrides, named):
    with pytest.raises(ConfigError, match=re.escape(named)):
        validate(load_config(os.path.join(ROOT, "experiments", "debug_moe.yaml"), overrides))
    ok = load_config(os.path.join(ROOT, "experiments", "debug_moe.yaml"),
                     ["train.eval_tasks=[arc_easy,tests/x.yaml]", f"train.eval_include_path={ROOT}"])
    validate(ok)
    assert ok.train.eval_tasks == ["arc_easy", "tests/x.yaml"]
