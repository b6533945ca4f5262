"""Downstream evaluation through lm-eval-harness, end to end and offline, on the tiny tasks of
tests/fixtures/lm_eval_tasks (multiple choice, rolling loglikelihood, generation).

The reference is lm-eval's own Hugging Face model (`HFLM`) on the `moe export --hf` folder of the same
checkpoint: our adapter's loglikelihoods, rolling loglikelihoods and greedy generations equal its, and
`moe eval --tasks` reports the metrics that lm-eval computes with it. In the training loop the
metrics land in metrics.jsonl (and W&B, against tokens and FLOPs), equal `moe eval --tasks` on the
final checkpoint, and `moe compare` tabulates and plots them. lm_eval is imported once per module
(seconds), and the module runs on one pytest-xdist worker."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from moe.cli import main
from moe.metrics import training_env
from tests.helpers import ROOT, assert_png, read_metrics, read_offline_run, table_rows

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("transformers")
pytestmark = pytest.mark.xdist_group("downstream")  # one worker: the export, HFLM and lm_eval import made once

TASKS_DIR = os.path.join(ROOT, "tests", "fixtures", "lm_eval_tasks")
TASKS = ["moe_tiny_mc", "moe_tiny_text", "moe_tiny_gen"]


@pytest.fixture(autouse=True)
def no_debug(monkeypatch):
    monkeypatch.delenv("MOE_DEBUG", raising=False)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The committed format-1 MoE checkpoint (renormalised gates: Mixtral's) and its transformers export."""
    root = tmp_path_factory.mktemp("downstream")
    run = root / "v1_moe"
    shutil.copytree(os.path.join(ROOT, "tests", "fixtures", "checkpoint_v1", "v1_moe"), run)
    step_cfg = run / "checkpoints" / "step_00000003" / "config.yaml"
    step_cfg.write_text(step_cfg.read_text().replace("renormalize: false", "renormalize: true"))
    main(["export", str(run), "--hf", str(root / "hf")])
    return run, root / "hf"


@pytest.fixture(scope="module")
def models(exported):
    """(our adapter, lm-eval's HFLM) on the same weights, fp32."""
    from lm_eval.models.huggingface import HFLM

    from moe.tools.inference import load_run
    from moe.train.downstream import lm_eval_model

    run, hf = exported
    model, tok, cfg = load_run(str(run))
    return lm_eval_model(model, cfg.model, tok, batch_size=3), HFLM(pretrained=str(hf), batch_size=3, device="cpu",
                                                                     dtype="float32")


def _requests(kind, args):
    from lm_eval.api.instance import Instance

    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def test_loglikelihoods_equal_lm_evals_hf_model_on_the_export(models):
    ours, hf = models
    long_context = "def f(x):\n    return x\n" * 6  # 138 bytes: cut from the left to the 64-token window
    requests = _requests("loglikelihood", [
        ("import os\nimport sys\n\n\ndef main():\n    ", "return None"),  # trailing spaces move to the continuation
        ("for i in range(10):\n", "    print(i)"),
        ("", "def f(x):"),  # no context: EOS as the one conditioning token
        (long_context, " + 1\n"),
        ("x = [1, 2, 3]\nfor item in ", "x:"),
    ])
    got, want = ours.loglikelihood(requests), hf.loglikelihood(requests)
    for (lp, greedy), (lp_hf, greedy_hf) in zip(got, want):
        assert lp == pytest.approx(lp_hf, abs=1e-4) and greedy == greedy_hf
    assert len({round(lp, 3) for lp, _ in got}) == len(got)  # distinct requests, distinct numbers

    texts = _requests("loglikelihood_rolling", [(long_context,), ("x = 1\n",), ("class A:\n    pass\n" * 9,)])
    got, want = ours.loglikelihood_rolling(texts), hf.loglikelihood_rolling(texts)
    assert got == pytest.approx(want, abs=1e-4) and all(v < -10 for v in got)


def test_greedy_generations_equal_lm_evals_hf_model(models):
    ours, hf = models
    until = {"until": ["\n"], "max_gen_toks": 12, "do_sample": False}
    requests = _requests("generate_until", [("def square(x):\n    return x * ", until),
                                            ("import ", {"until": ["s"], "max_gen_toks": 20, "do_sample": False}),
                                            ("    def __init__(self", until)])
    got = ours.generate_until(requests)
    assert got == hf.generate_until(requests)
    assert all("\n" not in g for g in got) and "s" not in got[1]


def test_moe_eval_tasks_prints_and_writes_what_lm_eval_computes_with_hf(exported, models, tmp_path, capsys):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from moe.train.downstream import task_metrics

    run, _ = exported
    out = tmp_path / "results.json"
    main(["eval", str(run), "--tasks", ",".join(TASKS), "--include-path", TASKS_DIR, "--out", str(out),
          "--batch-size", "3"])
    rows = table_rows(capsys.readouterr().out)
    assert rows["__header__"] == ["task", "metric", "value", "documents"]
    report = json.loads(out.read_text())
    assert report["tasks"] == TASKS and report["samples"] == {"moe_tiny_mc": 8, "moe_tiny_text": 4, "moe_tiny_gen": 6}
    ours = report["results"]
    assert set(ours["moe_tiny_mc"]) == {"acc", "acc_norm"} and 0 <= ours["moe_tiny_mc"]["acc"] <= 1
    assert set(ours["moe_tiny_text"]) == {"word_perplexity", "byte_perplexity", "bits_per_byte"}
    assert "exact_match" in ours["moe_tiny_gen"]
    hf_results = simple_evaluate(model=models[1], tasks=TASKS, bootstrap_iters=0, log_samples=False,
                                 task_manager=TaskManager(include_path=TASKS_DIR, include_defaults=False))
    want = task_metrics(hf_results["results"])
    assert ours.keys() == want.keys()
    for task in ours:
        assert ours[task] == pytest.approx(want[task], rel=1e-4), task


def test_a_task_found_nowhere_is_one_error_line_before_the_model_loads(exported, tmp_path, capsys, monkeypatch):
    import lm_eval.tasks

    from moe.tools import inference

    class LocalOnly(lm_eval.tasks.TaskManager):
        """lm-eval's own task list costs ~13 s of CPU to index; searching only the include path, the
        lookup takes the same path (the name is in neither)."""

        def __init__(self, include_path=None, include_defaults=True, **kw):
            super().__init__(include_path=include_path or TASKS_DIR, include_defaults=False, **kw)

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", LocalOnly)
    monkeypatch.setattr(inference, "load_run", lambda *a, **k: pytest.fail("the model was loaded"))
    run, _ = exported
    out = tmp_path / "r.json"
    for tasks, named in [("moe_tiny_mc,moe_tiny_nope", "task 'moe_tiny_nope' not found in"),
                         ("missing/task.yaml", "task file missing/task.yaml not found"),
                         (" , ", "--tasks: no task named")]:
        with pytest.raises(SystemExit) as exc:
            main(["eval", str(run), "--tasks", tasks, "--include-path", TASKS_DIR, "--out", str(out)])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and err.startswith("error: ") and named in err and err.count("\n") == 1, err
    assert not out.exists()


@pytest.mark.slow
@pytest.mark.distributed
def test_in_loop_tasks_are_logged_equal_moe_eval_and_compared(workdir, data_cache, corpus, tmp_path, capsys):
    """Two processes at ep=2: the tasks run on every rank in lockstep (each forward exchanges tokens
    between the experts' ranks) and give what one process computes on the final checkpoint."""
    env = training_env({"WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"})
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "moe.cli",
         "train", "experiments/debug_moe.yaml", f"data.dataset={corpus}", f"data.cache_dir={data_cache}",
         "parallel.ep_size=2", "train.micro_batch_size=2", "train.steps=4", "train.eval_every=2",
         "train.eval_batches=1", "train.log_every=2", "train.eval_tasks=[moe_tiny_mc,moe_tiny_text]",
         "train.eval_tasks_limit=4", f"train.eval_include_path={TASKS_DIR}"],
        cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    run = workdir / "runs" / "debug_moe"
    evals = [m for m in read_metrics(run) if "loss/val" in m]
    keys = {"downstream/moe_tiny_mc/acc", "downstream/moe_tiny_mc/acc_norm", "downstream/moe_tiny_text/bits_per_byte"}
    assert [m["step"] for m in evals] == [2, 4] and all(keys <= set(m) for m in evals)
    wb = read_offline_run(str(run))
    assert wb["step_metrics"]["downstream/*"] == "tokens" and wb["step_metrics"]["downstream_vs_flops/*"] == "flops"
    assert {"downstream/moe_tiny_mc/acc", "downstream_vs_flops/moe_tiny_mc/acc"} <= wb["history_keys"]
    # the training engine's numbers are those of `moe eval --tasks` on the final checkpoint
    main(["eval", str(run), "--tasks", "moe_tiny_mc,moe_tiny_text", "--include-path", TASKS_DIR, "--limit", "4",
          "--out", str(tmp_path / "final.json")])
    final = json.loads((tmp_path / "final.json").read_text())["results"]
    assert evals[-1]["downstream/moe_tiny_mc/acc"] == final["moe_tiny_mc"]["acc"]
    assert evals[-1]["downstream/moe_tiny_text/bits_per_byte"] == pytest.approx(final["moe_tiny_text"]["bits_per_byte"],
                                                                                 rel=1e-5)
    capsys.readouterr()
    main(["compare", str(run), "--out", str(tmp_path / "cmp")])
    text = capsys.readouterr().out
    rows = table_rows(text[text.index("Downstream tasks"):].split("\n", 2)[2])
    assert float(rows["debug_moe"]["moe_tiny_mc acc"]) == pytest.approx(final["moe_tiny_mc"]["acc"], abs=1e-3)
    assert_png(tmp_path / "cmp" / "downstream_vs_tokens.png")
    assert_png(tmp_path / "cmp" / "downstream_vs_flops.png")
