"""The prepared GPU check must not rot between GPU sessions: run it on the CPU at small shapes."""
import json


from tests.helpers import ROOT


def test_gpu_check_runs_on_cpu(monkeypatch, tmp_path, capsys):
    """Every stage but `compiled`: its inductor compile from a cold cache took most of this test's ~110 s
    in CI, and the blocks it compiles are moe/parallel's `apply_compile`, which
    tests/unit/parallel/test_engine.py compiles and checks against eager (its own stage code is `training`'s
    with compile_blocks=True)."""
    from benchmarks.gpu_check import STAGES, main

    monkeypatch.chdir(ROOT)
    out = tmp_path / "gpu_check.json"
    stages = [s for s in STAGES if s != "compiled"]
    # one timed call per variant: a smoke test of the stages, not a timing (no figure is asserted)
    result = main(["--device", "cpu", "--dtype", "fp32", "--quick", "--reps", "1", "--stages", *stages,
                   "--json", str(out)])
    assert not [s for s in stages if "error" in result[s]], result
    assert result["ops"]["max_rel_err_fp32"] < 1e-5
    assert result["training"]["last"] < result["training"]["first"]
    ops_timed = {(r["backend"], r["op"]) for r in result["dispatch"]}
    assert {("reference", "unpermute bwd"), ("reference", "permute fwd")} <= ops_timed
    assert all(r["GBs"] > 0 and r["of_copy"] > 0 for r in result["dispatch"])
    assert {r["variant"] for r in result["layer"]} >= {"dense", "ours", "reference dispatch"}
    assert {r["shape"] for r in result["layer"]} == {"8:2:1024", "64:8:256"}  # coarse and fine-grained experts
    assert json.loads(out.read_text())["training"]["steps"] == result["training"]["steps"]
    assert "GPU check summary" in capsys.readouterr().out


def test_a_failing_stage_is_recorded_and_the_next_one_runs(monkeypatch, tmp_path, capsys):
    """A GPU session is short: one broken stage must not lose what the others measure."""
    import benchmarks.gpu_check as gc

    def broken(*args):
        raise RuntimeError("boom")

    monkeypatch.chdir(ROOT)
    monkeypatch.setitem(gc.STAGES, "ops", broken)
    out = tmp_path / "gpu_check.json"
    result = gc.main(["--device", "cpu", "--dtype", "fp32", "--quick", "--stages", "device", "ops", "dispatch",
                      "--json", str(out)])
    assert result["ops"] == {"error": "RuntimeError: boom"}
    assert result["dispatch"] and "error" not in result["device"]
    assert json.loads(out.read_text())["ops"]["error"] == "RuntimeError: boom"
    assert "ops: FAILED: RuntimeError: boom" in capsys.readouterr().out
