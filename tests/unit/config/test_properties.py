"""Whatever a user types as a numeric knob or as a YAML file, load_config + validate either accept it
(and then a tiny model built from it gives finite losses) or raise one ConfigError line naming the
key or the file. No other exception escapes and nothing is written. Deterministic: derandomized, no
example database."""
import dataclasses
import os
import typing

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moe.config import RANGES, Config, ConfigError, load_config, validate

from tests.helpers import ROOT
CONFIGS = [os.path.join(ROOT, "experiments", name) for name in ("debug_moe.yaml", "debug_dense.yaml")]
SECRET = "zq9PLANTEDq9z"  # in files that must never be echoed


def _all_keys(cls=Config, prefix=""):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _all_keys(hints[f.name], prefix + f.name + ".")
        else:
            yield prefix + f.name


ALL_KEYS = sorted(_all_keys())
NUMERIC_KEYS = sorted(RANGES) + ["model.moe.moe_layers"]

TEXT_VALUES = ["0", "-1", "1", "2", "3", "8", "nan", "inf", "-inf", ".inf", "-.inf", ".nan", "1e12", "1e3", "1e-3",
               "1e-300", "1e400", "-1e400", "1.5", "0.5", "'1e12'", '"3"', "true", "null", "", "abc", "[1]", "[0,1]",
               "[1e0]", "[-1]", "{a: 1}", "0x10", "1_000", "${train.steps}", "${oc.env:NOPE_NOT_SET}", "???",
               str(2**63), str(2**64 + 1), str(-2**63 - 1)]
VALUES = st.one_of(st.floats(allow_nan=True, allow_infinity=True).map(repr), st.integers(-2**70, 2**70).map(str),
                   st.sampled_from(TEXT_VALUES))
PY_VALUES = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-2**70, 2**70), st.booleans(),
                      st.none(), st.sampled_from(["abc", "1e12", "${model.d_model}", "${oc.env:NOPE_NOT_SET}", ""]),
                      st.lists(st.integers(-3, 9), max_size=3))

SETTINGS = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def listing(folder):
    """Every file and folder under `folder` (a new empty folder counts too)."""
    return sorted(os.path.relpath(os.path.join(d, name), folder)
                  for d, dirs, files in os.walk(folder) for name in dirs + files)


def check_forward(cfg):
    """A tiny accepted config builds a model whose loss and aux loss are finite on a tiny batch."""
    m = cfg.model
    tiny = (m.d_model <= 128 and m.n_layers <= 4 and m.max_seq_len <= 4096 and m.vocab_size <= 4096
            and m.moe.num_experts <= 16 and m.ffn_hidden <= 1024 and m.moe.expert_hidden <= 1024
            and m.moe.num_shared_experts <= 4)
    if not tiny:
        return
    from moe.nn.gpt import GPT

    torch.manual_seed(0)
    model = GPT(dataclasses.replace(m, vocab_size=m.vocab_size or 257))
    x = torch.randint(0, model.cfg.vocab_size, (2, min(8, m.max_seq_len)))
    out = model(x, x)
    assert torch.isfinite(out.loss) and torch.isfinite(out.aux_loss), (out.loss, out.aux_loss)


def assert_refused_well(exc, names):
    """One line that names one of `names` (what is at fault) and holds no planted secret."""
    message = str(exc)
    assert "\n" not in message, message
    assert any(n in message for n in names), message
    assert SECRET not in message, message


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return work


@SETTINGS
@given(base=st.sampled_from(CONFIGS), pairs=st.lists(st.tuples(st.sampled_from(NUMERIC_KEYS), VALUES), min_size=1,
                                                     max_size=3))
def test_any_numeric_override_is_accepted_or_refused_naming_its_key(workdir, base, pairs):
    overrides = [f"{k}={v}" for k, v in pairs]
    before = listing(workdir)
    try:
        cfg = load_config(base, overrides)
        validate(cfg)
    except ConfigError as exc:
        assert_refused_well(exc, [k for k, _ in pairs])
    else:
        check_forward(cfg)
    assert listing(workdir) == before


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


YAML_KEYS = ALL_KEYS + ["model.d_modle", "unknown", "train.seed", "defaults"]
MAPPINGS = st.lists(st.tuples(st.sampled_from(YAML_KEYS), PY_VALUES), max_size=4).map(_nest)
DEFAULTS = ["parent.yaml", "secret.txt", "bad.yaml", "missing.yaml", "c.yaml", "/etc/passwd", "../in/parent.yml",
            "list.yaml"]


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
    (inp / "secret.txt").write_text(f"password: {SECRET}\n")
    (inp / "bad.yaml").write_text(f"model:\n  d_model: {SECRET}\n   {SECRET}: [\n")
    (inp / "list.yaml").write_text(f"- {SECRET}\n")
    return inp


@SETTINGS
@given(text=yaml_texts())
def test_any_yaml_file_is_accepted_or_refused_naming_the_file(workdir, yaml_dir, text):
    path = yaml_dir / "c.yaml"
    path.write_text(text)
    files = listing(yaml_dir)
    before = listing(workdir)
    try:
        cfg = load_config(str(path))
        validate(cfg)
    except ConfigError as exc:
        # the file, or for a value only checked once resolved or validated, its key
        assert_refused_well(exc, [str(yaml_dir), "/etc/passwd"] + [k for k in ALL_KEYS if "." in k])
    else:
        check_forward(cfg)
    assert listing(workdir) == before and listing(yaml_dir) == files
