"""Fixtures shared by the tests (plain helpers live in tests/helpers.py)."""
import os

import pytest

from tests.helpers import ROOT, slurm_skip_reason


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """Make `xdist_group` group again under `--dist loadgroup`: pytest-xdist names a test's group by
    appending `@group` to its node id, which since pytest 9.2 (structured node ids) no longer takes, so
    every grouped test ran on any worker (module fixtures built once per worker, the Slurm tests on two
    workers at once; pytest-dev/pytest-xdist#1386). Runs after xdist's own hook; a no-op where that worked."""
    if not getattr(config.option, "loadgroup", False):
        return
    for item in items:
        names = sorted({str(m.args[0] if m.args else m.kwargs.get("name", "default"))
                        for m in item.iter_markers("xdist_group")})
        suffix = "@" + "_".join(names)
        if not names or item.nodeid.endswith(suffix):
            continue
        nodeid = item.nodeid + suffix
        if hasattr(item, "_id"):  # pytest >= 9.2: NodeId.parse keeps the exact string
            item._id = type(item._id).parse(nodeid)
        else:
            item._nodeid = nodeid


@pytest.fixture
def workdir(tmp_path):
    """A scratch folder with the experiments/ configs and a shared data cache."""
    os.symlink(os.path.join(ROOT, "experiments"), tmp_path / "experiments")
    return tmp_path


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory):
    """One token cache for the whole session, every xdist worker included (a cache folder is built once
    under a file lock, moe/data/cache.py `_build_once`): the embedded corpus is tokenized once."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):  # basetemp is <session>/popen-gwN: share <session>
        root = root.parent
    path = root / "data_cache"
    path.mkdir(exist_ok=True)
    return str(path)


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    """Fake Slurm commands on PATH: sinfo (partitions debug and big, no GPUs), sbatch (job 4242, or
    fails with FAKE_SBATCH_ERROR; calls are appended to <bin>/sbatch.calls) and squeue (prints the
    file <bin>/squeue.out if present: the tasks "still queued")."""
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir()
    (bin_dir / "sinfo").write_text("#!/bin/bash\ncase \"$*\" in *%P*) printf 'debug*\\nbig\\n' ;; "
                                   "*%G*) echo '(null)' ;; esac\n")
    (bin_dir / "sbatch").write_text(
        "#!/bin/bash\necho \"$@\" >> \"$(dirname \"$0\")/sbatch.calls\"\n"
        "if [[ -n ${FAKE_SBATCH_ERROR:-} ]]; then echo \"$FAKE_SBATCH_ERROR\" >&2; exit 1; fi\necho 4242\n")
    (bin_dir / "squeue").write_text("#!/bin/bash\ncat \"$(dirname \"$0\")/squeue.out\" 2>/dev/null || true\n")
    for f in ("sinfo", "sbatch", "squeue"):
        os.chmod(bin_dir / f, 0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    return bin_dir


@pytest.fixture(scope="session")
def text_corpus(tmp_path_factory):
    """A small local text corpus (the embedded one costs seconds of start-up in every process)."""
    import inspect
    import json as json_mod
    import textwrap

    path = tmp_path_factory.mktemp("text_corpus") / "corpus.txt"
    path.write_text("\n".join(inspect.getsource(m) for m in (json_mod, textwrap, inspect)))
    return str(path)


def tiny_run_args(corpus, data_cache, *extra):
    """`moe train` arguments for a debug MoE run that takes a second or two."""
    return ["train", "experiments/debug_moe.yaml", f"data.dataset={corpus}", f"data.cache_dir={data_cache}",
            "train.eval_every=0", "train.eval_batches=1", "train.log_every=1", "logging.wandb.mode=disabled", *extra]


@pytest.fixture(scope="session")
def corpus(text_corpus):
    """The small local corpus under its older name."""
    return text_corpus


@pytest.fixture(scope="module")
def slurm():
    reason = slurm_skip_reason()
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="module")
def module_workdir(tmp_path_factory):
    path = tmp_path_factory.mktemp("launch")
    os.symlink(os.path.join(ROOT, "experiments"), path / "experiments")
    return path
