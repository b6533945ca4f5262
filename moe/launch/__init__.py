"""`moe launch`: submit a training run to Slurm, or run it on this machine with torchrun.

One command does everything a reproducible multi-node run needs, in this order, and fails before
`sbatch` on anything it can check:

1. resolve the config (YAML + dotted overrides) and validate it for the job's world size
   (nodes x processes per node), check the Slurm options (node count, partition via `sinfo`);
2. write the run folder `runs/<name>/`: the resolved `config.yaml` (the job trains from it, so
   editing experiments/ later changes nothing), `submit.sbatch` (from `moe/launch/job.sbatch`), a code
   snapshot (`code/<time>/commit.txt` and the uncommitted diff, untracked files included except
   those that look like secrets: `left_out.txt` names them) and `launch.json`;
3. `sbatch` it and print the job id and the log paths (`--wait`: and wait for the job to end).

The job script can be resubmitted unchanged (`sbatch runs/<name>/submit.sbatch`); every start of it
resumes from the run's latest checkpoint. `--local N` runs the same thing on this machine with
`torchrun --standalone`, no Slurm; SIGTERM or Ctrl-C stops it with a checkpoint, exit 0. Secrets
are never written anywhere: no environment variable is copied into any file, and the values of
variables named like a secret (`*KEY*`, `*TOKEN*`, `*SECRET*`, `*PASSWORD*`, ...) are redacted
from every file this module writes; jobs inherit them from the environment at run time.

`python -m moe.launch world-info HOSTFILE` is the hostfile helper the job script uses with the
deepspeed launcher.
"""
from __future__ import annotations

import datetime
import json
import importlib.resources
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from moe.errors import MoeError
from moe.config import Config, ConfigError, load_config, validate

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# the job script template ships inside the package (package data), so a wheel or `pip install .` has it
TEMPLATE = os.environ.get("MOE_LAUNCH_TEMPLATE", str(importlib.resources.files("moe.launch") / "job.sbatch"))

from moe.io import REDACTED, SECRET_NAME, atomic_write, redact, secret_values  # noqa: E402,F401  (re-exported)


class LaunchError(MoeError):
    """Bad launch options or a failed submission; the message is shown to the user as is."""


def _write(path: str, text: str, mode: int = 0o644) -> None:
    """Every file this module writes goes through here: redacted, then atomically replaced."""
    atomic_write(path, text, mode=mode)


# ------------------------------------------------------------------------------------------ options


@dataclass
class LaunchOptions:
    config: str
    overrides: List[str] = field(default_factory=list)
    nodes: int = 1
    gpus_per_node: int = 1
    local: int = 0
    """>0: run here with torchrun --standalone and this many processes; no Slurm."""
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    time: Optional[str] = None
    constraint: Optional[str] = None
    exclusive: bool = False
    mail_user: Optional[str] = None
    mail_type: Optional[str] = None
    cpus_per_task: int = 0
    mem: Optional[str] = None
    job_name: Optional[str] = None
    cpu: Optional[bool] = None
    """True: nodes have no GPU (request none); None: decide from the partition's GRES (sinfo)."""
    launcher: str = "torchrun"
    max_restarts: int = 0
    signal_s: int = 120
    array: Optional[str] = None
    env: List[str] = field(default_factory=list)
    sbatch_args: List[str] = field(default_factory=list)
    dry_run: bool = False
    wait: bool = False


@dataclass
class Task:
    """One training run of the job: its config and run folder (an array job has several)."""

    cfg: Config
    task_id: Optional[int] = None

    @property
    def run_dir(self) -> str:
        return os.path.join(self.cfg.run.root, self.cfg.run.name)

    @property
    def config_path(self) -> str:
        return os.path.join(self.run_dir, "config.yaml")


def parse_array_spec(spec: str) -> Tuple[List[int], Optional[int]]:
    """Slurm's --array syntax: `0-7`, `0-15:4`, `1,3,8-9`, optionally `%N` (at most N at once)."""
    m = re.fullmatch(r"([0-9,:\-]+)(?:%(\d+))?", spec.strip())
    if not m:
        raise LaunchError(f"--array {spec!r}: expected Slurm's syntax, e.g. 0-7, 0-15:4, 1,3,5 or 0-7%2")
    ids: List[int] = []
    for part in m.group(1).split(","):
        r = re.fullmatch(r"(\d+)(?:-(\d+)(?::(\d+))?)?", part)
        if not r:
            raise LaunchError(f"--array {spec!r}: cannot read {part!r}")
        lo = int(r.group(1))
        hi = int(r.group(2)) if r.group(2) is not None else lo
        step = int(r.group(3) or 1)
        if hi < lo or step < 1:
            raise LaunchError(f"--array {spec!r}: empty range {part!r}")
        ids.extend(range(lo, hi + 1, step))
    if len(set(ids)) != len(ids):
        raise LaunchError(f"--array {spec!r}: a task id appears twice")
    throttle = int(m.group(2)) if m.group(2) else None
    if throttle == 0:
        raise LaunchError(f"--array {spec!r}: %0 would never run a task")
    return sorted(ids), throttle


def world_size(opts: LaunchOptions) -> int:
    return opts.local if opts.local > 0 else opts.nodes * opts.gpus_per_node


# ------------------------------------------------------------------------------------------- checks


def _have(cmd: str) -> bool:
    return shutil.which(cmd) is not None


def slurm_partitions() -> Optional[List[str]]:
    """Partition names from `sinfo` (the default one without its `*`), or None without Slurm."""
    if not _have("sinfo"):
        return None
    proc = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        return None
    return sorted({p.strip().rstrip("*") for p in proc.stdout.split() if p.strip()})


def partition_has_gpus(partition: Optional[str]) -> Optional[bool]:
    """Whether the partition's nodes advertise GPU GRES; None when it cannot be asked."""
    if not _have("sinfo"):
        return None
    cmd = ["sinfo", "-h", "-o", "%G"] + (["-p", partition] if partition else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        return None
    return "gpu" in proc.stdout


def check_options(opts: LaunchOptions) -> None:
    """Everything about the launch itself that can be wrong, before any file is written."""
    if opts.local < 0:
        raise LaunchError(f"--local must be >= 1 processes, got {opts.local}")
    if opts.local and opts.array:
        raise LaunchError("--array needs Slurm; it cannot be combined with --local")
    if not opts.local:
        if opts.nodes < 1:
            raise LaunchError(f"--nodes must be >= 1, got {opts.nodes}")
        if opts.gpus_per_node < 1:
            raise LaunchError(f"--gpus-per-node must be >= 1, got {opts.gpus_per_node}")
    if opts.launcher not in ("torchrun", "deepspeed"):
        raise LaunchError(f"--launcher must be torchrun or deepspeed, got {opts.launcher!r}")
    if opts.launcher == "deepspeed" and opts.max_restarts:
        raise LaunchError("--max-restarts needs --launcher torchrun (the deepspeed launcher does not restart workers)")
    if opts.max_restarts < 0:
        raise LaunchError(f"--max-restarts must be >= 0, got {opts.max_restarts}")
    if opts.signal_s < 0:
        raise LaunchError(f"--signal-seconds must be >= 0, got {opts.signal_s}")
    if opts.cpus_per_task < 0:
        raise LaunchError(f"--cpus-per-task must be >= 0, got {opts.cpus_per_task}")
    for item in opts.env:
        key = item.split("=", 1)[0]
        if "=" not in item or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise LaunchError(f"--env {item!r}: expected NAME=VALUE")
        if SECRET_NAME.search(key):
            raise LaunchError(f"--env {key}: looks like a secret and would be written into the job script; "
                              f"export it in the environment instead (jobs inherit it at run time)")
    if opts.array:
        parse_array_spec(opts.array)
    if opts.partition and not opts.local:
        known = slurm_partitions()
        if known is not None and opts.partition not in known:
            raise LaunchError(f"--partition {opts.partition!r}: unknown partition; sinfo knows: {', '.join(known)}")


def resolve_tasks(opts: LaunchOptions) -> List[Task]:
    """The validated config of every run the job trains. With --array, `{task}` in an override is
    replaced by the array task id, and each task gets its own run folder `<name>_<id>`."""
    if not opts.array:
        return check_tasks(opts, [(None, load_config(opts.config, opts.overrides))])
    ids, _ = parse_array_spec(opts.array)
    cfgs = []
    for i in ids:
        cfg = load_config(opts.config, [o.replace("{task}", str(i)) for o in opts.overrides])
        cfg.run.name = f"{cfg.run.name}_{i}"
        cfgs.append((i, cfg))
    return check_tasks(opts, cfgs)


def check_tasks(opts: LaunchOptions, cfgs: Sequence[Tuple[Optional[int], Config]]) -> List[Task]:
    """Tasks from (array task id, config) pairs, each validated for the job's world size and checked
    against what its run folder already holds; two tasks may not share a run folder."""
    world = world_size(opts)
    tasks = []
    for task_id, cfg in cfgs:
        ep = cfg.parallel.ep_size
        where = f"--local {opts.local}" if opts.local else f"--nodes {opts.nodes} x --gpus-per-node {opts.gpus_per_node}"
        run = f"run {cfg.run.name}: " if task_id is not None else ""
        if ep >= 1 and world % ep:
            raise ConfigError(f"{run}parallel.ep_size ({ep}) must divide the world size {world} ({where})")
        try:
            validate(cfg, world)
            _check_run_dir(cfg)
        except ConfigError as exc:
            raise ConfigError(f"{run}{exc}") from None
        tasks.append(Task(cfg, task_id))
    names = [t.cfg.run.name for t in tasks]
    if len(set(names)) != len(names):
        raise LaunchError(f"array tasks share a run folder: {names}")
    return tasks


def _check_run_dir(cfg: Config) -> None:
    """The check of train.prepare_run_dir, without writing: refuse a folder of another run, or
    starting over (checkpoint.resume=false) a folder that holds checkpoints."""
    from moe.train.loop import check_run_dir

    check_run_dir(cfg)


# ------------------------------------------------------------------------------------------ writing


def _quote(value: str) -> str:
    return shlex.quote(value)


def _sbatch_directives(opts: LaunchOptions, job_name: str, log_dir: str, gpus: bool) -> List[str]:
    d = [f"--job-name={job_name}", f"--nodes={opts.nodes}", "--ntasks-per-node=1"]
    if gpus:
        d.append(f"--gpus-per-node={opts.gpus_per_node}")
    if opts.cpus_per_task:
        d.append(f"--cpus-per-task={opts.cpus_per_task}")
    for flag, value in (("partition", opts.partition), ("account", opts.account), ("qos", opts.qos),
                        ("time", opts.time), ("constraint", opts.constraint), ("mem", opts.mem),
                        ("mail-user", opts.mail_user), ("mail-type", opts.mail_type)):
        if value:
            d.append(f"--{flag}={value}")
    if opts.exclusive:
        d.append("--exclusive")
    if opts.array:
        d.append(f"--array={opts.array}")
    out = "slurm-%A_%a.out" if opts.array else "slurm-%j.out"
    d += [f"--signal=USR2@{opts.signal_s}", "--requeue", "--open-mode=append",
          f"--output={os.path.join(log_dir, out)}", f"--chdir={os.getcwd()}"]
    d += list(opts.sbatch_args)
    return ["#SBATCH " + x for x in d]


def _run_selection(tasks: List[Task]) -> str:
    if tasks[0].task_id is None:
        t = tasks[0]
        return f"export MOE_RUN_DIR={_quote(t.run_dir)}\nexport MOE_CONFIG={_quote(t.config_path)}"
    lines = ["# array job: each task trains its own run folder",
             'case "$SLURM_ARRAY_TASK_ID" in']
    for t in tasks:
        lines.append(f"    {t.task_id}) export MOE_RUN_DIR={_quote(t.run_dir)} MOE_CONFIG={_quote(t.config_path)} ;;")
    lines.append('    *) echo "[moe launch] no run for array task $SLURM_ARRAY_TASK_ID" >&2; exit 1 ;;')
    lines.append("esac")
    return "\n".join(lines)


def render_sbatch(opts: LaunchOptions, tasks: List[Task], script_path: str, job_dir: str,
                  command: Sequence[str]) -> str:
    """The job script, from moe/launch/job.sbatch."""
    if not os.path.isfile(TEMPLATE):
        raise LaunchError(f"job script template not found: {TEMPLATE} (set MOE_LAUNCH_TEMPLATE to a job.sbatch, "
                          f"or reinstall moe: it ships as moe/launch/job.sbatch)")
    gpus = not opts.cpu
    if opts.cpu is None:
        has = partition_has_gpus(opts.partition)
        gpus = True if has is None else has
    job_name = opts.job_name or f"moe-{tasks[0].cfg.run.name if len(tasks) == 1 else os.path.basename(job_dir)}"
    threads = max(1, opts.cpus_per_task // opts.gpus_per_node) if opts.cpus_per_task else 1
    values = {
        "SBATCH": "\n".join(_sbatch_directives(opts, job_name, os.path.abspath(os.path.join(job_dir, "logs")), gpus)),
        "DATE": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S %Z"),
        "COMMAND": " ".join(_quote(c) for c in command),
        "SCRIPT": os.path.abspath(script_path),
        "SIGNAL_S": str(opts.signal_s),
        "PYTHON": _quote(sys.executable),
        "LAUNCHER": opts.launcher,
        "NPROC_PER_NODE": str(opts.gpus_per_node),
        "MAX_RESTARTS": str(opts.max_restarts),
        "RUN_SELECTION": _run_selection(tasks),
        "OMP_NUM_THREADS": str(threads),
        "EXTRA_ENV": "\n".join(f"export {k}={_quote(v)}" for k, v in (e.split("=", 1) for e in opts.env))
                     or "# (no --env settings)",
    }
    text = open(TEMPLATE).read()
    # the template's own header comment is for readers of launch/, not of the job script
    lines = text.splitlines(keepends=True)
    text = lines[0] + "".join(lines[3:])
    text += "" if text.endswith("\n") else "\n"

    def fill(m: "re.Match[str]") -> str:
        if m.group(1) not in values:
            raise LaunchError(f"{TEMPLATE}: unknown placeholder {m.group(0)}")
        return values[m.group(1)]

    return re.sub(r"\{\{([A-Z_]+)\}\}", fill, text)


def _git(args: List[str], cwd: str) -> Optional[str]:
    try:
        proc = subprocess.run(["git", "--no-optional-locks", *args], cwd=cwd, capture_output=True, text=True,
                              timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout if proc.returncode == 0 else None


# Untracked files that are left out of the code snapshot by their name (matched against the file's
# name, lower-cased): env files, keys and certificates, credential stores of common tools.
SECRET_FILE_NAMES = (".env*", "*.env", "*.pem", "*.key", "*.p12", "*.pfx", "*.jks", "*.keystore", "*.kdbx",
                     "id_rsa*", "id_dsa*", "id_ecdsa*", "id_ed25519*", ".netrc", "_netrc",
                     ".npmrc", ".pypirc", ".git-credentials", ".htpasswd", ".pgpass", ".s3cfg", ".boto",
                     ".dockercfg", "credentials*", "*secret*", "*password*", "*passwd*", "*apikey*",
                     "*api_key*", "*api-key*", "service-account*.json", "*-sa-key*.json")
# and any name with `token` in it, but not `tokens` (data, plots: `loss_vs_tokens.png`) nor `tokenizer`
_SECRET_TOKEN_NAME = re.compile(r"token(?!s|i[sz])")
# Folders whose files are all left out (any folder of the path, lower-cased).
SECRET_DIR_NAMES = frozenset({".ssh", ".gnupg", ".aws", ".azure", ".docker", ".kube", ".secrets", "secrets",
                              "credentials"})
# Contents that give a file away: a private key, or a token in a well-known format.
SECRET_CONTENT = re.compile(
    rb"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----"
    rb"|\bhf_[A-Za-z0-9]{30,}|\bgh[pousr]_[A-Za-z0-9]{36,}|\bgithub_pat_[A-Za-z0-9_]{40,}"
    rb"|\b(?:AKIA|ASIA)[0-9A-Z]{16}\b|\bxox[abprs]-[A-Za-z0-9-]{10,}|\bsk-(?:proj-|ant-)?[A-Za-z0-9_-]{32,}")


def secret_file_reason(rel: str, data: Optional[bytes] = None, env: Optional[Dict[str, str]] = None) -> Optional[str]:
    """Why the file `rel` (a path; `data` its contents, when read) must stay out of the code
    snapshot, or None: its name looks like a secret's, it holds a private key or a token of a
    well-known format, or it contains the value of an environment variable named like a secret."""
    import fnmatch

    *folders, name = rel.replace(os.sep, "/").lower().split("/")
    if SECRET_DIR_NAMES.intersection(folders):
        return "it lies in a folder of secrets"
    if any(fnmatch.fnmatchcase(name, pattern) for pattern in SECRET_FILE_NAMES) or _SECRET_TOKEN_NAME.search(name):
        return "its name looks like a secret's"
    if data is None:
        return None
    if SECRET_CONTENT.search(data):
        return "it holds a private key or an access token"
    if any(value.encode() in data for value in secret_values(env)):
        return "it contains the value of a secret environment variable"
    return None


def write_code_snapshot(run_dir: str, stamp: str, max_untracked_bytes: int = 1 << 20,
                        source: Optional[str] = None) -> str:
    """code/<stamp>/commit.txt (commit, branch, status) and uncommitted.diff: `git diff HEAD` plus
    untracked, not ignored files under 1 MiB as new-file diffs, of the checkout `source` (default:
    the one moe runs from). Untracked files that look like secrets (see `secret_file_reason`) are
    left out and named, with the reason, in left_out.txt; secret values are redacted everywhere."""
    source = source or ROOT
    out = os.path.join(run_dir, "code", stamp)
    head = _git(["rev-parse", "HEAD"], source)
    if head is None:
        _write(os.path.join(out, "commit.txt"), f"source: {source}\nnot a git checkout: no code snapshot\n")
        return out
    branch = (_git(["rev-parse", "--abbrev-ref", "HEAD"], source) or "?").strip()
    status = _git(["status", "--porcelain"], source) or ""
    diff = _git(["diff", "HEAD", "--binary"], source) or ""
    skipped, secret = [], []
    for rel in (_git(["ls-files", "--others", "--exclude-standard", "-z"], source) or "").split("\0"):
        path = os.path.join(source, rel)
        if not rel or not os.path.isfile(path) or os.path.islink(path):
            continue
        reason = secret_file_reason(rel)
        if reason is None and os.path.getsize(path) > max_untracked_bytes:
            skipped.append(rel)
            continue
        if reason is None:
            try:
                with open(path, "rb") as f:
                    reason = secret_file_reason(rel, f.read())
            except OSError as exc:
                reason = f"unreadable ({exc.strerror})"
        if reason is not None:
            secret.append((rel, reason))
            continue
        proc = subprocess.run(["git", "--no-optional-locks", "diff", "--no-index", "--binary", "/dev/null", rel],
                              cwd=source, capture_output=True, text=True, errors="replace")
        diff += proc.stdout
    left_out = [f"{rel}: {reason}" for rel, reason in secret]
    left_out += [f"{rel}: over {max_untracked_bytes} bytes" for rel in skipped]
    _write(os.path.join(out, "commit.txt"),
           f"source: {source}\ncommit: {head.strip()}\nbranch: {branch}\n"
           f"uncommitted changes: {len(status.splitlines())} file(s) (see uncommitted.diff; "
           f"apply with `git apply uncommitted.diff` on this commit)\n"
           + (f"untracked files over {max_untracked_bytes} bytes, not in the diff: {', '.join(skipped)}\n"
              if skipped else "")
           + (f"untracked files that look like secrets, not in the diff: {', '.join(r for r, _ in secret)} "
              f"(see left_out.txt)\n" if secret else "")
           + "\ngit status --porcelain:\n" + status)
    _write(os.path.join(out, "uncommitted.diff"), diff)
    if left_out:
        _write(os.path.join(out, "left_out.txt"),
               "Untracked files of the checkout that are not in uncommitted.diff (names only):\n"
               + "".join(line + "\n" for line in left_out))
    if secret:
        print(f"[moe launch] code snapshot: left out {len(secret)} untracked file(s) that look like secrets: "
              f"{', '.join(r for r, _ in secret)} (listed in {os.path.join(out, 'left_out.txt')})",
              file=sys.stderr, flush=True)
    return out


def _prepare_run_dirs(tasks: List[Task]) -> None:
    """Create each run folder and write its resolved config through the trainer's own check."""
    from moe.train.loop import prepare_run_dir

    for t in tasks:
        prepare_run_dir(t.cfg, is_writer=True)


def _record_launch(job_dir: str, entry: dict) -> None:
    path = os.path.join(job_dir, "launch.json")
    history = []
    if os.path.isfile(path):
        try:
            history = json.load(open(path)).get("launches", [])
        except (ValueError, AttributeError):
            history = []
    history.append(entry)
    _write(path, json.dumps({"launches": history}, indent=2) + "\n")


# ----------------------------------------------------------------------------------------- Slurm I/O


def sbatch(script_path: str) -> str:
    if not _have("sbatch"):
        raise LaunchError("sbatch not found: this machine is not a Slurm login node (try --local N, or "
                          "launch/local_cluster.sh up for a local test cluster)")
    from moe.metrics import training_env

    # the job inherits this environment (sbatch --export=ALL)
    proc = subprocess.run(["sbatch", "--parsable", script_path], capture_output=True, text=True, env=training_env())
    if proc.returncode != 0:
        raise LaunchError("sbatch failed:\n" + (proc.stderr.strip() or proc.stdout.strip()))
    return proc.stdout.strip().split(";")[0]


ACTIVE_STATES = ("PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "COMPLETING",
                 "SUSPENDED", "RESIZING", "STAGE_OUT", "SIGNALING")


def active_array_tasks(job_id: str) -> Dict[int, str]:
    """{array task id: state} of the tasks of array job `job_id` that are still queued or running
    (squeue lists only those); empty when the job has ended or Slurm cannot be asked."""
    if not _have("squeue"):
        return {}
    proc = subprocess.run(["squeue", "-h", "-r", "-j", str(job_id), "-o", "%K %T"], capture_output=True, text=True,
                          timeout=60)
    out = {}
    for line in proc.stdout.splitlines() if proc.returncode == 0 else []:
        task, _, state = line.strip().partition(" ")
        if task.isdigit() and state in ACTIVE_STATES:
            out[int(task)] = state
    return out


def job_states(job_id: str) -> Dict[str, Tuple[str, str]]:
    """{job id: (state, exit code)} for the job (every task of an array), from scontrol."""
    proc = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True)
    out = {}
    for line in proc.stdout.splitlines():
        fields = dict(kv.split("=", 1) for kv in line.split() if "=" in kv)
        if "JobId" in fields:
            out[fields["JobId"]] = (fields.get("JobState", "?"), fields.get("ExitCode", "?"))
    return out


def wait_for_job(job_id: str, poll_s: float = 2.0) -> bool:
    """Block until the job (and a requeued job's next starts) has ended; True if it completed."""
    active = ACTIVE_STATES
    last = None
    while True:
        states = job_states(job_id)
        summary = ", ".join(f"{j} {s}" for j, (s, _) in sorted(states.items()))
        if summary != last:
            print(f"[moe launch] {time.strftime('%H:%M:%S')} {summary or 'job ' + job_id + ' not found'}", flush=True)
            last = summary
        if not states:
            return False
        if all(s not in active for s, _ in states.values()):
            return all(s == "COMPLETED" for s, _ in states.values())
        time.sleep(poll_s)


# -------------------------------------------------------------------------------------------- entry


def launch(opts: LaunchOptions, argv: Sequence[str] = ()) -> int:
    """The `moe launch` command; returns the exit status."""
    check_options(opts)
    tasks = resolve_tasks(opts)
    command = ["moe", "launch", *argv]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    if opts.local:
        return _launch_local(opts, tasks[0], command, stamp)

    if len(tasks) == 1:
        job_dir = tasks[0].run_dir
    else:  # the array job's own folder holds its script and job logs, next to the task folders
        first = tasks[0]
        job_dir = os.path.join(first.cfg.run.root, first.cfg.run.name[:-len(f"_{first.task_id}")])
    job_id = submit(opts, tasks, job_dir, command, stamp)
    if job_id is None or not opts.wait:
        return 0
    return 0 if wait_and_summarise(job_id, tasks) else 1


def submit(opts: LaunchOptions, tasks: List[Task], job_dir: str, command: Sequence[str],
           stamp: Optional[str] = None) -> Optional[str]:
    """Write the run folders and `job_dir/submit.sbatch` for checked tasks (one job, or one array
    task each when `opts.array` is set) and sbatch it; returns the job id, None on a dry run."""
    stamp = stamp or time.strftime("%Y%m%d-%H%M%S")
    script_path = os.path.join(job_dir, "submit.sbatch")
    script = render_sbatch(opts, tasks, script_path, job_dir, command)
    if opts.dry_run:
        print(redact(script), end="")
        print(f"# dry run: nothing written, nothing submitted; the job would train "
              f"{', '.join(t.config_path for t in tasks)}", file=sys.stderr)
        return None

    _prepare_run_dirs(tasks)
    os.makedirs(os.path.join(job_dir, "logs"), exist_ok=True)
    _write(script_path, script, mode=0o755)
    for t in tasks:
        write_code_snapshot(t.run_dir, stamp)
    job_id = sbatch(script_path)
    _record_launch(job_dir, {"job_id": job_id, "time": stamp, "command": list(command), "script": script_path,
                             "configs": [t.config_path for t in tasks], "options": asdict(opts)})
    logs = os.path.join(job_dir, "logs")
    out = f"slurm-{job_id}_<task>.out" if opts.array else f"slurm-{job_id}.out"
    print(f"submitted job {job_id}: {opts.nodes} node(s) x {opts.gpus_per_node} process(es), "
          f"{len(tasks)} run(s)")
    print(f"  script:     {script_path}  (resubmit with: sbatch {script_path})")
    run_dirs = [t.run_dir for t in tasks]
    if len(tasks) > 1 and len({os.path.dirname(d) for d in run_dirs}) == 1:
        print(f"  runs:       {', '.join(os.path.basename(d) for d in run_dirs)}")
        run_dirs = [os.path.join(os.path.dirname(run_dirs[0]), "<run>")]
    print(f"  config:     {', '.join(os.path.join(d, 'config.yaml') for d in run_dirs)}")
    print(f"  job log:    {os.path.join(logs, out)}")
    job = "<task's job id>" if opts.array else job_id
    print(f"  rank logs:  {', '.join(os.path.join(d, 'logs', job, 'restart_<n>') for d in run_dirs)}")
    print(f"  metrics:    {', '.join(os.path.join(d, 'metrics.jsonl') for d in run_dirs)}")
    sys.stdout.flush()
    return job_id


def wait_and_summarise(job_id: str, tasks: List[Task]) -> bool:
    """Wait for the job to end and print each run's final state; True if every task completed."""
    ok = wait_for_job(job_id)
    for t in tasks:
        summary = os.path.join(t.run_dir, "summary.json")
        if os.path.isfile(summary):
            s = json.load(open(summary))
            print(f"[moe launch] {t.cfg.run.name}: {s.get('status')}, step {s.get('steps')}, "
                  f"train loss {s.get('train_loss')}, val loss {s.get('val_loss')}")
    return ok


def _launch_local(opts: LaunchOptions, task: Task, command: Sequence[str], stamp: str) -> int:
    """torchrun --standalone on this machine, in the foreground. SIGTERM, Ctrl-C (SIGINT) or SIGHUP
    stops it cleanly: the trainers save a checkpoint and the exit status is 0 (see `_LocalRun`)."""
    log_dir = os.path.join(task.run_dir, "logs", f"local-{stamp}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={opts.local}",
           f"--max-restarts={opts.max_restarts}", f"--log-dir={log_dir}", "--redirects=3", "--tee=3",
           "-m", "moe.cli", "train", task.config_path]
    env_lines = [f"export {k}={_quote(v)}" for k, v in (e.split("=", 1) for e in opts.env)]
    script = ("#!/bin/bash\n# Written by `moe launch --local` on " + stamp + ":\n#   "
              + " ".join(_quote(c) for c in command) + "\n# Run it again to resume from the latest checkpoint.\n"
              + f"set -euo pipefail\ncd {_quote(os.getcwd())}\n" + "".join(line + "\n" for line in env_lines)
              + " ".join(_quote(c) for c in cmd) + "\n")
    if opts.dry_run:
        print(redact(script), end="")
        print(f"# dry run: nothing written, nothing started; the run would train {task.config_path}",
              file=sys.stderr)
        return 0
    _prepare_run_dirs([task])
    _write(os.path.join(task.run_dir, "launch_local.sh"), script, mode=0o755)
    write_code_snapshot(task.run_dir, stamp)
    _record_launch(task.run_dir, {"local": opts.local, "time": stamp, "command": list(command),
                                  "configs": [task.config_path], "options": asdict(opts)})
    print(f"[moe launch] local: {opts.local} process(es) on this machine, config {task.config_path}, "
          f"rank logs {log_dir}", flush=True)
    from moe.metrics import training_env

    env = training_env(dict(e.split("=", 1) for e in opts.env))
    env.pop("SLURM_JOB_ID", None)  # inside an allocation too, a stop signal must not requeue it
    run = _LocalRun()
    started = time.time()
    stops = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR2)
    previous = {s: signal.signal(s, run.handle) for s in stops}
    try:
        run.start(cmd, env)
        code = run.proc.wait()
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    code = 128 - code if code < 0 else code  # killed by a signal: the shell's convention
    if not run.stop_signal:
        return code
    status = _summary_status(task.run_dir, since=started)
    if status == "preempted":
        print(f"[moe launch] stopped on {signal.Signals(run.stop_signal).name} as asked, checkpoint saved; "
              f"the same command (or bash {os.path.join(task.run_dir, 'launch_local.sh')}) resumes it", flush=True)
        return 0
    if status == "finished":  # it ended by itself as the request came
        return code
    print(f"[moe launch] stopped on {signal.Signals(run.stop_signal).name} without a final checkpoint "
          f"(run status {status or 'unknown'}, torchrun exit {code})", file=sys.stderr, flush=True)
    return code or 1


def _summary_status(run_dir: str, since: float) -> Optional[str]:
    """The status in the run's summary.json if the trainer wrote it after `since`, else None."""
    path = os.path.join(run_dir, "summary.json")
    try:
        if os.path.getmtime(path) < since:
            return None
        with open(path) as f:
            return json.load(f).get("status")
    except (OSError, ValueError, AttributeError):
        return None


def _torchrun_child_setup() -> None:
    """In the torchrun child before exec: a process group of its own, so that a Ctrl-C at the
    terminal reaches `moe launch` only (which turns it into a clean stop), and USR2 ignored (its
    default action would kill torchrun; the trainers install their own handler)."""
    os.setpgid(0, 0)
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


class _LocalRun:
    """The torchrun of `moe launch --local` and the signals this process passes on to it.

    torchrun starts each worker (trainer rank) in a session of its own, and on SIGTERM or SIGINT it
    raises (a traceback), kills its workers and exits 1, so a stop request is sent to the workers
    directly: SIGTERM (also for SIGINT and SIGHUP) makes every rank save a checkpoint at the next
    step and exit 0, after which torchrun exits 0 too; USR2 is passed on as is. A second stop
    request kills the whole run at once."""

    def __init__(self) -> None:
        self.proc: Optional[subprocess.Popen] = None
        self.stop_signal = 0  # the first stop request (SIGTERM, SIGINT, SIGHUP), 0 if none
        self._pending: List[int] = []  # received before torchrun started

    def start(self, cmd: Sequence[str], env: Dict[str, str]) -> None:
        self.proc = subprocess.Popen(list(cmd), env=env, stdin=subprocess.DEVNULL, preexec_fn=_torchrun_child_setup)
        for sig in self._pending:
            self._deliver(sig)
        self._pending = []

    def handle(self, sig: int, _frame) -> None:
        if self.proc is None:
            self._pending.append(sig)
        else:
            self._deliver(sig)

    def _workers(self) -> list:
        import psutil

        try:
            return psutil.Process(self.proc.pid).children()
        except psutil.Error:
            return []

    def _signal_workers(self, sig: int) -> bool:
        """Send `sig` to torchrun's workers; False when it has none (yet or any more)."""
        import psutil

        sent = False
        for worker in self._workers():
            try:
                worker.send_signal(sig)
                sent = True
            except psutil.Error:
                pass
        return sent

    def _signal_torchrun(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except OSError:
            pass

    def _deliver(self, sig: int) -> None:
        if sig == signal.SIGUSR2:  # the checkpoint-and-stop request of Slurm goes to the trainers as is
            self._signal_workers(sig)
            return
        name = signal.Signals(sig).name
        if self.stop_signal:
            print(f"[moe launch] {name} again: killing the run now", file=sys.stderr, flush=True)
            for worker in self._workers():  # each worker leads a process group of its own
                try:
                    os.killpg(worker.pid, signal.SIGKILL)
                except OSError:
                    pass
            self._signal_torchrun(signal.SIGKILL)
            return
        self.stop_signal = sig
        print(f"[moe launch] {name}: asking the training to save a checkpoint and stop "
              f"(send it again to kill it at once)", file=sys.stderr, flush=True)
        if not self._signal_workers(signal.SIGTERM):  # no worker yet: nothing to save, end torchrun
            self._signal_torchrun(signal.SIGTERM)


# ------------------------------------------------------------------------------------------ helpers


def read_hostfile(path: str) -> Dict[str, int]:
    """{host: slots} from a DeepSpeed hostfile (`host slots=N` per line, # comments), in file order."""
    hosts: Dict[str, int] = {}
    for n, line in enumerate(open(path), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"(\S+)\s+slots=(\d+)", line)
        if not m or m.group(1) in hosts or int(m.group(2)) < 1:
            raise LaunchError(f"{path}:{n}: expected a new `host slots=N` line, got {line!r}")
        hosts[m.group(1)] = int(m.group(2))
    if not hosts:
        raise LaunchError(f"{path}: no hosts")
    return hosts


def world_info(hostfile: str) -> str:
    """deepspeed.launcher.launch's --world_info (urlsafe base64 of {host: [slot ids]}) for a hostfile.
    Pure Python on purpose: importing deepspeed prints to stdout, and the job script captures this."""
    import base64

    info = {host: list(range(slots)) for host, slots in read_hostfile(hostfile).items()}
    return base64.urlsafe_b64encode(json.dumps(info).encode()).decode()


def main(argv: Optional[List[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 2 and argv[0] == "world-info":
        print(world_info(argv[1]))
        return
    print("usage: python -m moe.launch world-info HOSTFILE   (for `moe launch`, see `moe launch --help`)",
          file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    main()
