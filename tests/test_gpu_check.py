"""The prepared GPU check must not rot between GPU sessions: run it on the CPU at small shapes."""
import os


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_check_runs_on_cpu(monkeypatch):
    from benchmarks.gpu_check import main

    monkeypatch.chdir(ROOT)
    result = main(["--device", "cpu", "--dtype", "fp32", "--quick"])
    assert result["ops_max_rel_err_fp32"] < 1e-5
    assert result["training"]["last"] < result["training"]["first"]
    assert {r["backend"] for r in result["dispatch"]} >= {"reference"}
