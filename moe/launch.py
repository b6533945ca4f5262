"""`moe launch`: submit a training run to Slurm, or run it on this machine with torchrun.

One command does everything a reproducible multi-node run needs, in this order, and fails before
`sbatch` on anything it can check:

1. resolve the config (YAML + dotted overrides) and validate it for the job's world size
   (nodes x processes per node), check the Slurm options (node count, partition via `sinfo`);
2. write the run folder `runs/<name>/`: the resolved `config.yaml` (the job trains from it, so
   editing experiments/ later changes nothing), `submit.sbatch` (from `launch/job.sbatch`), a code
   snapshot (`code/<time>/commit.txt` and the uncommitted diff) and `launch.json`;
3. `sbatch` it and print the job id and the log paths (`--wait`: and wait for the job to end).

The job script can be resubmitted unchanged (`sbatch runs/<name>/submit.sbatch`); every start of it
resumes from the run's latest checkpoint. `--local N` runs the same thing on this machine with
`torchrun --standalone`, no Slurm. Secrets are never written anywhere: no environment variable is
copied into any file, and the values of variables named like a secret (`*KEY*`, `*TOKEN*`,
`*SECRET*`, `*PASSWORD*`, ...) are redacted from every file this module writes; jobs inherit them
from the environment at run time.

`python -m moe.launch world-info HOSTFILE` is the hostfile helper the job script uses with the
deepspeed launcher.
"""
from __future__ import annotations

import datetime
import json
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

from moe.config import Config, ConfigError, config_from_yaml_text, load_config, validate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEMPLATE = os.environ.get("MOE_LAUNCH_TEMPLATE", os.path.join(ROOT, "launch", "job.sbatch"))

SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSW|CREDENTIAL|AUTH|COOKIE|PRIVATE", re.IGNORECASE)
REDACTED = "<redacted>"


class LaunchError(Exception):
    """Bad launch options or a failed submission; the message is shown to the user as is."""


# ------------------------------------------------------------------------------------------ secrets


def secret_values(env: Optional[Dict[str, str]] = None) -> List[str]:
    """Values of environment variables named like a secret (long enough not to be a common word)."""
    env = os.environ if env is None else env
    return sorted({v for k, v in env.items() if SECRET_NAME.search(k) and len(v) >= 6}, key=len, reverse=True)


def redact(text: str, env: Optional[Dict[str, str]] = None) -> str:
    for value in secret_values(env):
        text = text.replace(value, REDACTED)
    return text


def _write(path: str, text: str, mode: int = 0o644) -> None:
    """Every file this module writes goes through here: redacted, then atomically replaced."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".tmp", "w") as f:
        f.write(redact(text))
    os.chmod(path + ".tmp", mode)
    os.replace(path + ".tmp", path)


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
    """The check of train.prepare_run_dir, without writing: refuse a folder of another run."""
    from moe.train import config_differences

    path = os.path.join(cfg.run.root, cfg.run.name, "config.yaml")
    if not os.path.isfile(path) or cfg.run.overwrite:
        return
    try:
        diff = config_differences(config_from_yaml_text(open(path).read()), cfg)
    except ConfigError as exc:
        diff = [f"(unreadable: {exc})"]
    if diff:
        raise ConfigError(f"{os.path.dirname(path)} already holds a run with a different config (differs in: "
                          f"{', '.join(diff[:8])}); choose another run.name or pass run.overwrite=true")


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
    """The job script, from launch/job.sbatch."""
    if not os.path.isfile(TEMPLATE):
        raise LaunchError(f"job script template not found: {TEMPLATE} (moe must be installed from a checkout, "
                          f"`pip install -e .`, or MOE_LAUNCH_TEMPLATE must point to launch/job.sbatch)")
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


def write_code_snapshot(run_dir: str, stamp: str, max_untracked_bytes: int = 1 << 20) -> str:
    """code/<stamp>/commit.txt (commit, branch, status) and uncommitted.diff: `git diff HEAD` plus
    untracked, not ignored files under 1 MiB as new-file diffs. Secret values are redacted."""
    out = os.path.join(run_dir, "code", stamp)
    head = _git(["rev-parse", "HEAD"], ROOT)
    if head is None:
        _write(os.path.join(out, "commit.txt"), f"source: {ROOT}\nnot a git checkout: no code snapshot\n")
        return out
    branch = (_git(["rev-parse", "--abbrev-ref", "HEAD"], ROOT) or "?").strip()
    status = _git(["status", "--porcelain"], ROOT) or ""
    diff = _git(["diff", "HEAD", "--binary"], ROOT) or ""
    skipped = []
    for rel in (_git(["ls-files", "--others", "--exclude-standard", "-z"], ROOT) or "").split("\0"):
        path = os.path.join(ROOT, rel)
        if not rel or not os.path.isfile(path):
            continue
        if os.path.getsize(path) > max_untracked_bytes:
            skipped.append(rel)
            continue
        proc = subprocess.run(["git", "--no-optional-locks", "diff", "--no-index", "--binary", "/dev/null", rel],
                              cwd=ROOT, capture_output=True, text=True, errors="replace")
        diff += proc.stdout
    _write(os.path.join(out, "commit.txt"),
           f"source: {ROOT}\ncommit: {head.strip()}\nbranch: {branch}\n"
           f"uncommitted changes: {len(status.splitlines())} file(s) (see uncommitted.diff; "
           f"apply with `git apply uncommitted.diff` on this commit)\n"
           + (f"untracked files over {max_untracked_bytes} bytes, not in the diff: {', '.join(skipped)}\n"
              if skipped else "")
           + "\ngit status --porcelain:\n" + status)
    _write(os.path.join(out, "uncommitted.diff"), diff)
    return out


def _prepare_run_dirs(tasks: List[Task]) -> None:
    """Create each run folder and write its resolved config through the trainer's own check."""
    from moe.train import prepare_run_dir

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
    """torchrun --standalone on this machine, in the foreground; signals are passed on to it."""
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
    # torchrun ignores USR2 (its default action would kill it); the trainers install their handler
    proc = subprocess.Popen(cmd, env=env, preexec_fn=lambda: signal.signal(signal.SIGUSR2, signal.SIG_IGN))

    def forward(sig: int, _frame) -> None:
        if sig == signal.SIGUSR2:  # the checkpoint-and-stop request goes to the trainers themselves
            import psutil

            for child in psutil.Process(proc.pid).children(recursive=True):
                try:
                    child.send_signal(sig)
                except psutil.Error:
                    pass
        else:  # torchrun passes SIGTERM on to its workers
            proc.send_signal(sig)

    # Ctrl-C reaches torchrun and its workers through the terminal; this process just waits
    handlers = {signal.SIGTERM: forward, signal.SIGUSR2: forward, signal.SIGINT: signal.SIG_IGN}
    previous = {s: signal.signal(s, h) for s, h in handlers.items()}
    try:
        return proc.wait()
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


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
