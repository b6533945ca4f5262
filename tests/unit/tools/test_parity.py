"""moe/tools/parity.py without processes: parse_layout (aliases, nproc, errors), compare() of the
layouts' per-step records against the first layout (relative tolerance; token counts by the largest
count difference over the layer's total), run_layouts' checks before anything is launched, the
commands it launches, and main_parity's exit status. The multi-process parity runs themselves are in
tests/integration/test_expert_parallel.py."""
import copy
import io
import json
import os
import subprocess
import sys

import pytest

import moe.tools.parity as parity
from moe.config import ConfigError
from moe.tools.parity import ParityError, _token_diff, compare, main_parity, parse_layout, run_layouts

from tests.helpers import ROOT

MOE_YAML = os.path.join(ROOT, "experiments", "debug_moe.yaml")


# --------------------------------------------------------------------------------------- parse_layout


@pytest.mark.parametrize("spec,default,expected", [
    ("ep=2", None, (None, ["parallel.ep_size=2"])),
    ("ep=2", 4, (4, ["parallel.ep_size=2"])),
    ("ep=2,zero=1,nproc=4", 2, (4, ["parallel.ep_size=2", "train.zero_stage=1"])),
    ("mbs=2,np=3", None, (3, ["train.micro_batch_size=2"])),
    ("compile=true", 1, (1, ["train.compile=true"])),
    ("model.moe.top_k=1,train.lr=1e-3", None, (None, ["model.moe.top_k=1", "train.lr=1e-3"])),
    (" ep=4 , , zero=0 ", None, (None, ["parallel.ep_size=4", "train.zero_stage=0"])),
    ("model.moe.router=topk=x", None, (None, ["model.moe.router=topk=x"])),  # the first = splits
    ("", 2, (2, [])),
])
def test_parse_layout(spec, default, expected):
    assert parse_layout(spec, default) == expected


@pytest.mark.parametrize("spec,match", [
    ("ep", r"^layout 'ep': expected key=value, got 'ep'$"),
    ("ep=2,zero", r"^layout 'ep=2,zero': expected key=value, got 'zero'$"),
    ("ep=2,nproc=0", r"^layout 'ep=2,nproc=0': nproc must be >= 1$"),
    ("np=-1", r"nproc must be >= 1"),
])
def test_parse_layout_errors_name_the_layout(spec, match):
    with pytest.raises(ParityError, match=match):
        parse_layout(spec, None)


# -------------------------------------------------------------------------------------------- compare


def record(step, loss=2.5, grad_norm=1.25, aux_loss=0.011, z_loss=0.0, tokens=None):
    return {"step": step, "loss": loss, "grad_norm": grad_norm, "aux_loss": aux_loss, "seq_aux_loss": 0.0,
            "global_aux_loss": 0.0, "z_loss": z_loss,
            "tokens_per_expert": tokens if tokens is not None else {"0": [10, 6, 8, 8], "1": [8, 8, 8, 8]}}


def layout(n_steps=3, **per_step):
    return {"meta": {}, "steps": [record(s, **per_step) for s in range(1, n_steps + 1)]}


def changed(res, step, **values):
    res = copy.deepcopy(res)
    res["steps"][step - 1].update(values)
    return res


def run_compare(results, tolerance=1e-5):
    out = io.StringIO()
    failures = compare(results, tolerance, out=out)
    return failures, out.getvalue()


def test_equal_layouts_have_no_failure_and_a_row_per_step_and_layout():
    ref = layout()
    failures, table = run_compare([("ep=1,nproc=2", ref), ("ep=2,nproc=2", copy.deepcopy(ref))])
    assert failures == []
    lines = table.splitlines()
    assert lines[0] == "reference: ep=1,nproc=2; columns: value (relative difference to the reference)"
    assert lines[1].split() == ["step", "layout", "loss", "aux_loss", "grad_norm", "tokens/expert"]  # z_loss: all 0
    assert sum("ep=2,nproc=2" in line for line in lines) == 3 and sum("ep=1,nproc=2" in line for line in lines) == 4


def test_a_loss_off_by_more_than_the_tolerance_is_one_failure_naming_layout_step_and_quantity():
    ref = layout()
    other = changed(ref, 2, loss=2.5 * (1 + 1e-3))
    failures, table = run_compare([("ep=1", ref), ("ep=2", other)])
    assert failures == ["ep=2 step 2: loss 2.5025 vs 2.5 (rel diff 1.00e-03)"]
    assert "(1.0e-03)" in table
    # within the tolerance: no failure
    assert run_compare([("ep=1", ref), ("ep=2", changed(ref, 2, loss=2.5 * (1 + 1e-6)))])[0] == []
    assert run_compare([("ep=1", ref), ("ep=2", other)], tolerance=2e-3)[0] == []


@pytest.mark.parametrize("key", ["grad_norm", "aux_loss"])
def test_grad_norm_and_aux_losses_are_compared(key):
    ref = layout()
    failures, _ = run_compare([("a", ref), ("b", changed(ref, 3, **{key: ref["steps"][2][key] * 1.1}))])
    assert len(failures) == 1 and failures[0].startswith(f"b step 3: {key} ")


def test_an_aux_loss_that_is_zero_only_in_the_reference_is_a_failure():
    ref = layout()
    failures, _ = run_compare([("a", ref), ("b", changed(ref, 1, z_loss=0.5))])
    assert len(failures) == 1 and failures[0].startswith("b step 1: z_loss ")


@pytest.mark.parametrize("where", ["layout", "both"])
def test_a_non_finite_loss_never_matches(where):
    ref = layout()
    if where == "both":
        ref = changed(ref, 1, loss=float("nan"))
    failures, _ = run_compare([("a", ref), ("b", changed(ref, 1, loss=float("nan")))])
    assert len(failures) == 1 and failures[0].startswith("b step 1: loss nan vs ")


def test_token_counts_by_the_largest_difference_over_the_layers_total():
    ref = layout()
    other = changed(ref, 1, tokens_per_expert={"0": [11, 5, 8, 8], "1": [8, 8, 8, 8]})  # 1 of 32 tokens moved
    failures, table = run_compare([("a", ref), ("b", other)])
    assert failures == ["b step 1: per-expert token counts differ by 3.12e-02 of the tokens: "
                        "{'0': [11, 5, 8, 8], '1': [8, 8, 8, 8]} vs {'0': [10, 6, 8, 8], '1': [8, 8, 8, 8]}"]
    assert run_compare([("a", ref), ("b", other)], tolerance=0.04)[0] == []
    assert _token_diff({"0": [11, 5, 8, 8]}, {"0": [10, 6, 8, 8]}) == 1 / 32
    assert _token_diff({"0": [4, 4], "1": [1, 7]}, {"0": [4, 4], "1": [4, 4]}) == 3 / 8  # the worst layer
    assert _token_diff({}, {}) == 0.0 and _token_diff({"0": [0, 0]}, {"0": [0, 0]}) == 0.0


@pytest.mark.parametrize("tokens", [{"0": [10, 6, 8], "1": [8, 8, 8, 8]}, {"0": [10, 6, 8, 8]}],
                         ids=["other expert count", "layer missing"])
def test_token_counts_of_another_shape_are_a_failure(tokens):
    ref = layout()
    failures, _ = run_compare([("a", ref), ("b", changed(ref, 2, tokens_per_expert=tokens))])
    assert len(failures) == 1 and failures[0].startswith("b step 2: per-expert token counts differ by inf")


def test_a_missing_step_is_a_failure():
    failures, _ = run_compare([("a", layout(3)), ("b", layout(2))])
    assert failures == ["b: step 3 missing"]


def test_every_layout_is_compared_to_the_first():
    ref = layout()
    off = changed(ref, 1, loss=3.0)
    failures, _ = run_compare([("a", ref), ("b", copy.deepcopy(ref)), ("c", off), ("d", copy.deepcopy(off))])
    assert [f.split(" step")[0] for f in failures] == ["c", "d"]


# -------------------------------------------------------------------------------- run_layouts, main_parity


@pytest.fixture
def no_processes(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"a layout was launched: {args}")
    monkeypatch.setattr(parity.subprocess, "run", refuse)


@pytest.mark.parametrize("layouts,match", [
    (["ep=1", "ep"], r"^layout 'ep': expected key=value"),
    (["ep=1,nproc=1", "ep=3"], r"^layout 'ep=3' \(3 processes\): .*ep_size"),  # 3 does not divide 4 experts
    (["ep=1", "model.moe.nope=1"], r"^layout 'model.moe.nope=1' \(1 processes\): .*nope"),
])
def test_every_layout_is_checked_before_any_is_launched(tmp_path, no_processes, layouts, match):
    with pytest.raises(ParityError, match=match):
        run_layouts(MOE_YAML, ["train.global_batch_size=12"], layouts, 2, None, 1e-5, str(tmp_path))
    assert os.listdir(tmp_path) == []


def test_an_unknown_key_in_a_layout_is_a_config_error_naming_it(tmp_path, no_processes):
    """Without a global batch in the config, the layouts' configs are loaded to size it first: an unknown
    key fails there, as the one-line ConfigError of its override (not yet a ParityError)."""
    with pytest.raises(ConfigError, match=r"^override 'model.moe.nope=1': model.moe.nope"):
        run_layouts(MOE_YAML, [], ["ep=1", "model.moe.nope=1"], 2, None, 1e-5, str(tmp_path))
    assert os.listdir(tmp_path) == []


@pytest.fixture
def fake_layout_runs(monkeypatch):
    """subprocess.run replaced by a layout run that writes the same records for every layout (or fails
    when the command holds `train.lr=0.5`); the commands and environments it was called with."""
    calls = []

    def run(cmd, stdout, stderr, env, timeout):
        calls.append((cmd, env))
        if "train.lr=0.5" in cmd:
            stdout.write("Traceback ...\nRuntimeError: the worker broke\n")
            return subprocess.CompletedProcess(cmd, 1)
        out = cmd[cmd.index("--out") + 1]
        with open(out, "w") as f:
            json.dump(layout(int(cmd[cmd.index("--steps") + 1])), f)
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(parity.subprocess, "run", run)
    return calls


def test_run_layouts_launches_each_layout_with_the_same_global_batch(tmp_path, fake_layout_runs, capsys):
    results, failures = run_layouts(MOE_YAML, ["train.seq_len=32"], ["ep=1,nproc=1", "ep=2"], 2, None, 1e-5,
                                    str(tmp_path))
    assert failures == []
    assert [name for name, _ in results] == ["ep=1,nproc=1", "ep=2,nproc=2"]  # the default nproc: the largest ep
    (one, env1), (two, _) = fake_layout_runs
    # debug_moe leaves the global batch 0: micro batch 4 x the largest nproc (2), for every layout
    tail = ["-m", "moe.tools.parity", "worker", MOE_YAML, "train.seq_len=32", "train.global_batch_size=8"]
    assert one == [sys.executable, *tail, "parallel.ep_size=1", "--steps", "2", "--out", str(tmp_path / "layout0.json")]
    assert two == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *tail,
                   "parallel.ep_size=2", "--steps", "2", "--out", str(tmp_path / "layout1.json")]
    assert env1["WANDB_MODE"] == "disabled" and "OMP_NUM_THREADS" in env1
    assert "[parity] ep=2 (2 processes)" in capsys.readouterr().out


def test_a_failed_layout_names_it_with_its_log(tmp_path, fake_layout_runs):
    with pytest.raises(ParityError) as info:
        run_layouts(MOE_YAML, [], ["ep=1", "ep=1,train.lr=0.5"], 2, 1, 1e-5, str(tmp_path))
    text = str(info.value)
    assert text.startswith(f"layout 'ep=1,train.lr=0.5' failed (exit 1); log {tmp_path / 'layout1.log'}:")
    assert "RuntimeError: the worker broke" in text


def parity_args(tmp_path, keep=None):
    return type("Args", (), {"config": MOE_YAML, "overrides": [], "layouts": ["ep=1", "ep=2"], "steps": 3,
                             "nproc": None, "tolerance": 1e-5, "keep": keep, "dump": False})()


@pytest.mark.parametrize("outcome,code", [("ok", 0), ("differ", 1), ("error", 2)])
def test_main_parity_exit_status(tmp_path, monkeypatch, capsys, outcome, code):
    workdirs = []

    def fake(config, overrides, layouts, steps, nproc, tolerance, workdir, dump):
        workdirs.append(workdir)
        if outcome == "error":
            raise ParityError("layout 'ep=3' (3 processes): parallel.ep_size must divide 4")
        return [("ep=1", {}), ("ep=2", {})], (["ep=2 step 1: loss 3 vs 2 (rel diff 5.00e-01)"] if outcome == "differ"
                                              else [])

    monkeypatch.setattr(parity, "run_layouts", fake)
    assert main_parity(parity_args(tmp_path)) == code
    out, err = capsys.readouterr()
    if outcome == "ok":
        assert out.strip().endswith("OK: 2 layouts agree within 1e-05 over 3 steps")
    elif outcome == "differ":
        assert "FAIL: 1 differences above 1e-05:" in err and "  ep=2 step 1: loss 3 vs 2" in err
    else:
        assert err == "error: layout 'ep=3' (3 processes): parallel.ep_size must divide 4\n"
    assert not os.path.exists(workdirs[0])  # the temporary folder is removed
    keep = tmp_path / "keep"
    assert main_parity(parity_args(tmp_path, keep=str(keep))) == code
    assert workdirs[1] == str(keep) and keep.is_dir()  # --keep keeps it


def test_a_non_integer_nproc_is_a_layout_error():
    with pytest.raises(ParityError, match="nproc must be an integer, got 'abc'"):
        parse_layout("ep=2,nproc=abc", None)
