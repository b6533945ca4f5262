"""moe/launch/script.py: the job script rendered from moe/launch/job.sbatch."""
import pytest

import moe.launch.script
from moe.launch import LaunchError, LaunchOptions, launch
from moe.launch.options import resolve_tasks
from moe.launch.script import render_sbatch, sbatch_directives

TINY = ["train.steps=3", "train.log_every=1", "train.eval_every=0"]


def opts(**kw):
    base = dict(config="experiments/debug_moe.yaml", overrides=list(TINY), nodes=2, gpus_per_node=1)
    base.update(kw)
    return LaunchOptions(**base)


def test_dry_run_prints_the_job_and_writes_nothing(workdir, monkeypatch, capsys, fake_slurm):
    monkeypatch.chdir(workdir)
    assert launch(opts(dry_run=True, max_restarts=2, time="00:30:00", partition="big")) == 0
    script = capsys.readouterr().out
    for needle in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --signal=USR2@120",
                   "#SBATCH --requeue", "#SBATCH --open-mode=append", "#SBATCH --time=00:30:00",
                   "#SBATCH --partition=big", f"#SBATCH --chdir={workdir}",
                   'MOE_HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)',
                   "--rdzv-backend=c10d", '--rdzv-endpoint="$MOE_HEAD_ADDR:$MOE_MASTER_PORT"',
                   "MOE_MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))", "export MOE_MAX_RESTARTS=2",
                   "export MOE_CONFIG=runs/debug_moe/config.yaml", "TORCH_NCCL_ASYNC_ERROR_HANDLING",
                   "GLOO_SOCKET_IFNAME", "--log-dir=", "--redirects=3 --tee=3", "trap '' USR2"):
        assert needle in script, needle
    assert "--gpus-per-node" not in script.split("set -euo")[0]  # the fake partition has no GPU GRES
    assert not (workdir / "runs").exists()
    assert not (fake_slurm / "sbatch.calls").exists()


def render(workdir, monkeypatch, **kw):
    monkeypatch.chdir(workdir)
    o = opts(**kw)
    tasks = resolve_tasks(o)
    return render_sbatch(o, tasks, "runs/debug_moe/submit.sbatch", "runs/debug_moe", ["moe", "launch", "a b"])


def test_every_placeholder_is_filled_and_the_template_header_dropped(workdir, monkeypatch, fake_slurm):
    script = render(workdir, monkeypatch, cpu=False, cpus_per_task=8, gpus_per_node=4, env=["X=a b"])
    template = open(moe.launch.script.TEMPLATE).read()
    assert script.startswith("#!/bin/bash\n#SBATCH --job-name=moe-debug_moe\n")
    assert "Template of the job script" in template and "Template of the job script" not in script
    assert "{{" not in script and len(script.splitlines()) > len(template.splitlines()) - 3
    assert "#SBATCH --gpus-per-node=4\n#SBATCH --cpus-per-task=8\n" in script  # cpu=False: GPUs, whatever sinfo says
    assert "export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}\n" in script  # 8 CPUs over 4 processes
    assert "export X='a b'\n" in script and "#   moe launch 'a b'\n" in script
    assert f"sbatch {workdir}/runs/debug_moe/submit.sbatch" in script
    assert f"#SBATCH --output={workdir}/runs/debug_moe/logs/slurm-%j.out" in script
    assert "# (no --env settings)" in render(workdir, monkeypatch)


def test_directives_in_order():
    o = opts(partition="p", account="a", qos="q", time="1:00", constraint="c", mem="4G", mail_user="u",
             mail_type="END", exclusive=True, array="0-1", cpus_per_task=2, signal_s=60, sbatch_args=["--foo=1"])
    d = sbatch_directives(o, "job", "/logs", gpus=False)
    assert [x.split("=")[0] for x in d] == [
        "#SBATCH --job-name", "#SBATCH --nodes", "#SBATCH --ntasks-per-node", "#SBATCH --cpus-per-task",
        "#SBATCH --partition", "#SBATCH --account", "#SBATCH --qos", "#SBATCH --time", "#SBATCH --constraint",
        "#SBATCH --mem", "#SBATCH --mail-user", "#SBATCH --mail-type", "#SBATCH --exclusive", "#SBATCH --array",
        "#SBATCH --signal", "#SBATCH --requeue", "#SBATCH --open-mode", "#SBATCH --output", "#SBATCH --chdir",
        "#SBATCH --foo"]
    assert "#SBATCH --output=/logs/slurm-%A_%a.out" in d and "#SBATCH --signal=USR2@60" in d


def test_template_errors(workdir, monkeypatch, tmp_path, fake_slurm):
    missing = str(tmp_path / "nosuch.sbatch")
    monkeypatch.setattr(moe.launch.script, "TEMPLATE", missing)
    with pytest.raises(LaunchError) as info:
        render(workdir, monkeypatch)
    assert str(info.value) == (f"job script template not found: {missing} (set MOE_LAUNCH_TEMPLATE to a job.sbatch, "
                               f"or reinstall moe: it ships as moe/launch/job.sbatch)")
    bad = tmp_path / "bad.sbatch"
    bad.write_text("#!/bin/bash\n# header\n# header\n{{SBATCH}}\necho {{NO_SUCH}}\n")
    monkeypatch.setattr(moe.launch.script, "TEMPLATE", str(bad))
    with pytest.raises(LaunchError, match=r"bad.sbatch: unknown placeholder \{\{NO_SUCH\}\}"):
        render(workdir, monkeypatch)
    bad.write_text("#!/bin/bash\n# header\n# header\necho {{LAUNCHER}}")  # no final newline: one is added
    assert render(workdir, monkeypatch) == "#!/bin/bash\necho torchrun\n"
