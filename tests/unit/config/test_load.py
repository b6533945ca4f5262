"""moe/config/load.py: YAML files (with `defaults:` layering) and `key=value` overrides over the
dataclass defaults. Unknown keys, wrong types and files that cannot be configs fail at load time with
one ConfigError line naming the key, file or override (never echoing the file's text), before
anything is written; the dumps that get written (`to_yaml`, `to_dict`) never hold a secret's value."""
import dataclasses
import glob
import os
import typing

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moe.config import Config, ConfigError, config_from_yaml_text, load_config, to_dict, to_yaml
from moe.validate import validate

from tests.helpers import ROOT, assert_refused_well, check_forward, listing
EXPERIMENTS = os.path.join(ROOT, "experiments")
MOE_YAML = os.path.join(EXPERIMENTS, "debug_moe.yaml")
SECRET = "hf_planted_test_secret_4711"
PLANTED = "zq9PLANTEDq9z"  # in the property test's files that must never be echoed


# ------------------------------------------------------------------------------ 1. layers, overrides


def test_layering_and_overrides():
    cfg = load_config(MOE_YAML, ["model.n_layers=3", "train.steps=7"])
    assert cfg.model.moe.num_experts == 4  # from debug_moe.yaml
    assert cfg.model.d_model == 64  # from debug_dense.yaml via defaults
    assert cfg.model.n_layers == 3 and cfg.train.steps == 7
    assert cfg.run.name == "debug_moe"
    validate(cfg)


@pytest.mark.parametrize("overrides,match", [
    (["model.nlayers=3"], r"nlayers"),
    (["model.n_layers=three"], r"model\.n_layers"),
    (["notakey"], r"key=value"),
])
def test_unknown_keys_and_types(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(MOE_YAML, overrides)


def test_unknown_yaml_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  d_modle: 64\n")
    with pytest.raises(ConfigError, match="d_modle"):
        load_config(str(bad))


def test_missing_config_file():
    with pytest.raises(ConfigError, match="config file not found: nope.yaml"):
        load_config("nope.yaml")


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


# ------------------------------------------------------------------------------------------ 2. files


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
            validate(cfg, world_size=cfg.parallel.ep_size)  # presets for one node set ep_size=8
            assert config_from_yaml_text(to_yaml(cfg)) == cfg  # what a run folder stores reads back
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------------- 3. secrets


def test_secrets_are_redacted_in_written_config_but_kept_in_memory(tmp_path, monkeypatch):
    from moe.train.run_dir import config_differences, prepare_run_dir

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


# ------------------------------------------------------------------------- 4. any file, any contents


def _all_keys():
    def walk(cls, prefix):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                yield from walk(hints[f.name], prefix + f.name + ".")
            else:
                yield prefix + f.name

    return sorted(walk(Config, ""))


def _nest(pairs):
    """{"a.b": 1} -> {"a": {"b": 1}}; a deeper key under one that already holds a value is dropped."""
    out = {}
    for key, value in pairs:
        *parents, leaf = key.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {}) if isinstance(node.get(p, {}), dict) else {}
        node[leaf] = value
    return out


ALL_KEYS = _all_keys()
PY_VALUES = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-2**70, 2**70), st.booleans(),
                      st.none(), st.sampled_from(["abc", "1e12", "${model.d_model}", "${oc.env:NOPE_NOT_SET}", ""]),
                      st.lists(st.integers(-3, 9), max_size=3))
YAML_KEYS = ALL_KEYS + ["model.d_modle", "unknown", "train.seed", "defaults"]
MAPPINGS = st.lists(st.tuples(st.sampled_from(YAML_KEYS), PY_VALUES), max_size=4).map(_nest)
DEFAULTS = ["parent.yaml", "secret.txt", "bad.yaml", "missing.yaml", "c.yaml", "/etc/passwd", "../in/parent.yml",
            "list.yaml"]
SETTINGS = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@st.composite
def yaml_texts(draw):
    kind = draw(st.sampled_from(["random", "mapping", "mangled", "list", "empty", "defaults"]))
    if kind == "random":
        return draw(st.text(alphabet=st.sampled_from(list("abdelmnorst_.:-[]{},#'\"&*!|>%@`~ \t\n019")), max_size=120))
    if kind == "empty":
        return draw(st.sampled_from(["", "\n", "# a comment\n", "---\n", "  \n# x\n", "...\n"]))
    if kind == "list":
        return yaml.safe_dump(draw(st.lists(PY_VALUES, max_size=3)))
    text = yaml.safe_dump(draw(MAPPINGS), default_flow_style=draw(st.booleans()))
    if kind == "defaults":
        parents = draw(st.lists(st.sampled_from(DEFAULTS), min_size=1, max_size=2))
        return f"defaults: [{', '.join(parents)}]\n" + (text if text.strip() != "{}" else "")
    if kind == "mangled":  # tabs, a shifted line, a cut
        lines = text.splitlines(keepends=True)
        i = draw(st.integers(0, max(0, len(lines) - 1)))
        how = draw(st.sampled_from(["tab", "indent", "cut", "dedent"]))
        if lines and how == "tab":
            lines[i] = lines[i].replace("  ", "\t", 1)
        elif lines and how == "indent":
            lines[i] = "   " + lines[i]
        elif lines and how == "dedent":
            lines[i] = lines[i].lstrip()
        text = "".join(lines)
        if how == "cut":
            text = text[:draw(st.integers(0, len(text)))]
    return text


@pytest.fixture
def yaml_dir(tmp_path):
    inp = tmp_path / "in"
    inp.mkdir()
    (inp / "parent.yaml").write_text("model: {d_model: 64, n_heads: 2, n_layers: 2, max_seq_len: 64}\n"
                                     "train: {seq_len: 32, micro_batch_size: 2}\n")
    (inp / "parent.yml").write_text("train: {steps: 5}\n")
    (inp / "secret.txt").write_text(f"password: {PLANTED}\n")
    (inp / "bad.yaml").write_text(f"model:\n  d_model: {PLANTED}\n   {PLANTED}: [\n")
    (inp / "list.yaml").write_text(f"- {PLANTED}\n")
    return inp


@SETTINGS
@given(text=yaml_texts())
def test_any_yaml_file_is_accepted_or_refused_naming_the_file(empty_cwd, yaml_dir, text):
    """Whatever a user writes as a YAML file, load_config + validate either accept it (and then a tiny
    model built from it gives finite losses) or raise one ConfigError line naming the file (or, for a
    value only checked once resolved or validated, its key). No other exception escapes, nothing is
    written and no file's contents are echoed. Deterministic: derandomized, no example database."""
    path = yaml_dir / "c.yaml"
    path.write_text(text)
    files = listing(yaml_dir)
    before = listing(empty_cwd)
    try:
        cfg = load_config(str(path))
        validate(cfg)
    except ConfigError as exc:
        # the file, or for a value only checked once resolved or validated, its key
        assert_refused_well(exc, [str(yaml_dir), "/etc/passwd"] + [k for k in ALL_KEYS if "." in k], PLANTED)
    else:
        check_forward(cfg)
    assert listing(empty_cwd) == before and listing(yaml_dir) == files


@pytest.mark.parametrize("override", ["logging.wandb.tags=[router:]", "run.name='unclosed"])
def test_an_override_value_that_is_not_yaml_is_one_config_error(override):
    with pytest.raises(ConfigError, match="not a YAML scalar"):
        load_config(None, [override])
