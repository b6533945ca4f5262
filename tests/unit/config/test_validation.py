"""Config values, names, files and `moe generate` flags that cannot work fail at load or validate time
with one `ConfigError` line naming the key, file or flag, before anything is written."""
import dataclasses
import glob
import os
import re
import subprocess
import sys
import typing

import pytest

from moe.config import (RANGES, Config, ConfigError, config_from_yaml_text, load_config, to_dict, to_yaml,
                        validate)

from tests.helpers import ROOT
EXPERIMENTS = os.path.join(ROOT, "experiments")
MOE_YAML = os.path.join(EXPERIMENTS, "debug_moe.yaml")
SECRET = "hf_planted_test_secret_4711"


def error_of(overrides=(), path=MOE_YAML, world_size=1) -> str:
    with pytest.raises(ConfigError) as info:
        validate(load_config(path, list(overrides)), world_size)
    message = str(info.value)
    assert "\n" not in message, message
    return message


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
    with pytest.raises(ConfigError, match=r"^train\.lr must be > 0 and <= 10, got fast$"):
        validate(cfg)


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


def test_integral_floats_are_integers_and_fractions_are_refused(tmp_path):
    cfg = load_config(MOE_YAML, ["train.steps=1e3", "data.max_bytes=1e6", "model.moe.moe_layers=[1.0]"])
    assert (cfg.train.steps, cfg.data.max_bytes, cfg.model.moe.moe_layers) == (1000, 1000000, [1])
    assert isinstance(cfg.train.steps, int) and isinstance(cfg.data.max_bytes, int)
    path = tmp_path / "c.yaml"
    path.write_text("defaults: [" + MOE_YAML + "]\ntrain: {steps: 2.0e3}\n")
    assert load_config(str(path)).train.steps == 2000
    for override in ("train.steps=1.5", "train.steps=1e400", "train.steps=.nan"):
        with pytest.raises(ConfigError, match=r"train\.steps wants an integer, got"):
            load_config(MOE_YAML, [override])
    path.write_text("train: {steps: 2.5}\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: train\.steps wants an integer, got 2\.5"):
        load_config(str(path))
    with pytest.raises(ConfigError, match=r"train\.steps.*Integer"):  # a quoted string stays a string
        load_config(MOE_YAML, ["train.steps='1e3'"])


# ----------------------------------------------------------------------------------------- 2. names


@pytest.mark.parametrize("name", ["..", ".", "", "a/b", "../escape", "a\\b", "a\0b", "-rf", "line\nbreak",
                                  "x" * 201, "é" * 101])
def test_run_name_must_be_a_plain_folder_name(name):
    cfg = load_config(MOE_YAML)
    cfg.run.name = name
    with pytest.raises(ConfigError, match=r"^run\.name must be a plain folder name: ") as info:
        validate(cfg)
    assert "\n" not in str(info.value)


def test_run_name_from_overrides_and_good_names():
    assert "run.name" in error_of(["run.name=.."])
    assert "run.name" in error_of(["run.name=../x"])
    for name in ("my-run_1.2", "top_k=1,aux_loss_coef=0.01", "x" * 200, "a b"):
        cfg = load_config(MOE_YAML, ["run.root=/any/path/../is/fine"])
        cfg.run.name = name
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


# ------------------------------------------------------------------------------------------ 3. files


@pytest.mark.parametrize("text", ["", "\n\n", "# nothing but a comment\n", "---\n# still nothing\n"])
def test_empty_yaml_is_refused_naming_the_file(tmp_path, text):
    path = tmp_path / "empty.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=r"empty\.yaml: the file is empty"):
        load_config(str(path))


def test_defaults_must_be_yaml_files_and_their_contents_are_never_echoed(tmp_path):
    secret_file = tmp_path / "notes.txt"
    secret_file.write_text(f"password: {SECRET}\n")
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text(f"model:\n  d_model: 64\n   {SECRET}: [\n")
    (tmp_path / "binary.yml").write_bytes(b"\xff\xfe" + SECRET.encode())
    cfg = tmp_path / "c.yaml"
    for parent, match in [("notes.txt", r"notes\.txt: not a YAML config file"),
                          ("bad.yaml", r"bad\.yaml: invalid YAML at line 3, column \d+$"),
                          ("binary.yml", r"binary\.yml: not a YAML config file \(not UTF-8 text\)$"),
                          ("nope.yaml", r"config file not found: .*nope\.yaml"),
                          ("/etc/passwd", r"^/etc/passwd: not a YAML config file")]:
        cfg.write_text(f"defaults: [{parent}]\n")
        with pytest.raises(ConfigError, match=match) as info:
            load_config(str(cfg))
        assert SECRET not in str(info.value) and "root:" not in str(info.value)
    for defaults in ("[1, 2]", "{a: b}", "[[x.yaml]]"):
        cfg.write_text(f"defaults: {defaults}\n")
        with pytest.raises(ConfigError, match=r"c\.yaml: `defaults` must be a list of YAML file names"):
            load_config(str(cfg))


def test_defaults_are_relative_to_the_including_file(tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "parent.yaml").write_text("model: {d_model: 96}\n")
    (tmp_path / "sub" / "child.yml").write_text("defaults: [parent.yaml]\ntrain: {steps: 3}\n")
    monkeypatch.chdir(tmp_path)
    cfg = load_config("sub/child.yml")
    assert (cfg.model.d_model, cfg.train.steps, cfg.run.name) == (96, 3, "child")


@pytest.mark.parametrize("text,match", [
    (f"model:\n  d_model: {SECRET}\n   n_layers: 3\n", r"c\.yaml: invalid YAML at line 3, column 12$"),
    ("model: [\n", r"c\.yaml: invalid YAML at line 2, column 1$"),
    ("\tmodel: {}\n", r"c\.yaml: invalid YAML at line 1, column 1$"),
    ("train: {steps: 1}\ntrain: {steps: 2}\n", r"c\.yaml: invalid YAML at line 2, column 1$"),
    ("- model\n- train\n", r"c\.yaml: top level must be a mapping"),
    ("just text\n", r"c\.yaml: top level must be a mapping"),
    ("model: {d_modle: 64}\n", r"c\.yaml: model\.d_modle: Key 'd_modle' not in 'ModelConfig'"),
])
def test_top_level_yaml_errors_name_file_and_line_only(tmp_path, text, match):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match) as info:
        load_config(str(path))
    assert SECRET not in str(info.value)


def test_config_path_must_be_yaml(tmp_path):
    path = tmp_path / "config.txt"
    path.write_text("train: {steps: 3}\n")
    with pytest.raises(ConfigError, match=r"config\.txt: not a YAML config file"):
        load_config(str(path))


# ---------------------------------------------------------------------------------------- 4. secrets


def test_secrets_are_redacted_in_written_config_but_kept_in_memory(tmp_path, monkeypatch):
    from moe.train.loop import config_differences, prepare_run_dir

    monkeypatch.setenv("HF_TOKEN", SECRET)
    path = tmp_path / "secret.yaml"
    path.write_text(f"defaults: [{MOE_YAML}]\nlogging: {{wandb: {{tags: [a, 'x${{oc.env:HF_TOKEN}}y']}}}}\n")
    overrides = ["logging.wandb.entity=${oc.env:HF_TOKEN}", f"run.root={tmp_path}/runs"]
    cfg = load_config(str(path), overrides)
    validate(cfg)
    assert cfg.logging.wandb.entity == SECRET and cfg.logging.wandb.tags == ["a", f"x{SECRET}y"]
    text, data = to_yaml(cfg), to_dict(cfg)
    assert SECRET not in text and "<redacted>" in text
    assert SECRET not in repr(data)
    assert data["logging"]["wandb"]["entity"] == "<redacted>" and data["logging"]["wandb"]["tags"][1] == "x<redacted>y"
    # the file re-reads from the environment: a resumed run or a `moe launch` job gets the value back
    assert config_from_yaml_text(text).logging.wandb.entity == SECRET
    assert config_differences(config_from_yaml_text(text), cfg) == []

    run_dir = prepare_run_dir(cfg, is_writer=True)
    prepare_run_dir(load_config(str(path), overrides), is_writer=True)  # same config: reused, not refused
    with open(os.path.join(run_dir, "config.yaml")) as f:
        written = f.read()
    assert SECRET not in written and "<redacted>" in written

    monkeypatch.delenv("HF_TOKEN")  # elsewhere, without the secret: the placeholder, not an error
    assert config_from_yaml_text(written).logging.wandb.entity == "<redacted>"


def test_overlapping_secrets_are_each_replaced_whole(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", SECRET)
    monkeypatch.setenv("SHORT_KEY", SECRET[:8])  # also inside the longer one
    monkeypatch.setenv("ODD_PASSWORD", "redacted")  # also inside every replacement
    cfg = load_config(MOE_YAML, ["logging.wandb.entity=${oc.env:HF_TOKEN}:${oc.env:SHORT_KEY}"])
    assert to_dict(cfg)["logging"]["wandb"]["entity"] == "<redacted>:<redacted>"
    text = to_yaml(cfg)
    assert SECRET[:8] not in text
    assert config_from_yaml_text(text).logging.wandb.entity == cfg.logging.wandb.entity


def test_errors_do_not_print_secret_values(monkeypatch):
    monkeypatch.setenv("MY_API_KEY", SECRET)
    with pytest.raises(ConfigError) as info:
        load_config(MOE_YAML, ["train.lr=${oc.env:MY_API_KEY}"])
    assert "train.lr" in str(info.value) and SECRET not in str(info.value)


# ---------------------------------------------------------------------------------------- 5. generate


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
])
def test_sampling_flags_are_checked(kwargs, flag):
    from moe.tools.inference import check_sampling_args

    args = {"prompt": "def ", "max_new_tokens": 10, "temperature": 0.8, "top_k": 0, "top_p": 0.95, "seed": 0}
    check_sampling_args(**args)
    check_sampling_args(**{**args, "temperature": 0.0, "top_p": 1.0, "top_k": 5})
    with pytest.raises(ConfigError, match=f"^{flag} must"):
        check_sampling_args(**{**args, **kwargs})


def test_generate_flags_fail_before_the_run_is_opened(tmp_path, capsys):
    """The run folder does not exist: an error about a flag means no model was loaded first."""
    from moe.cli import main

    missing = str(tmp_path / "no_such_run")
    for flags, flag in [(["--prompt", ""], "--prompt"), (["--prompt", "x", "--top-p", "2"], "--top-p"),
                        (["--prompt", "x", "--max-new-tokens", "-1"], "--max-new-tokens")]:
        with pytest.raises(SystemExit) as info:
            main(["generate", missing, *flags])
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {flag} must") and err.count("\n") == 1, err
    proc = subprocess.run([sys.executable, "-m", "moe.cli", "generate", missing, "--prompt", "x", "--temperature",
                           "nan"], check=False, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error: --temperature must"), proc.stderr
    assert "Traceback" not in proc.stderr and os.listdir(tmp_path) == []


# --------------------------------------------------------------------------------- shipped experiments


def test_every_shipped_config_and_sweep_loads_and_validates(tmp_path):
    from moe.tools.sweep import load_sweep

    paths = sorted(glob.glob(os.path.join(EXPERIMENTS, "**", "*.yaml"), recursive=True))
    sweeps = [p for p in paths if os.sep + "sweeps" + os.sep in p]
    assert len(paths) >= 30 and len(sweeps) >= 8
    for path in paths:
        if path in sweeps:
            assert load_sweep(path, runs_root=str(tmp_path / "runs")).runs
        else:
            cfg = load_config(path)
            validate(cfg)
            assert config_from_yaml_text(to_yaml(cfg)) == cfg  # what a run folder stores reads back
    assert os.listdir(tmp_path) == []

