"""The training loop: config -> run folder -> distributed -> data -> model -> DeepSpeed engine -> steps.

Reads top to bottom. Periodic work (metrics, eval, checkpoints) goes through `Periodic`. Everything
needed to resume (step, tokens, sampler position, RNG, W&B run id; model, optimizer and scheduler
inside the DeepSpeed checkpoint) is one `TrainState` dict saved with each checkpoint, so running the
same command again continues where the last checkpoint left off.
"""
from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import Any, Dict

import numpy as np
import torch

from moe.train import checkpoint
from moe.errors import TrainingDiverged
from moe.io import RunLock, atomic_write
from moe.config import Config, ConfigError, config_from_yaml_text, grad_accum_steps, global_batch_size, to_dict, to_yaml, validate
from moe.train.host_memory import keep_freed_memory
from moe.nn.gpt import GPT, count_params, flops_per_token

# Keys whose change does not make a run folder "another run": extending or re-logging a run is fine,
# and so is resuming at another parallel layout (checkpoints are layout-free, see moe/train/checkpoint/__init__.py).
RESUMABLE_KEYS = ("train.steps", "train.eval_every", "train.log_every", "train.eval_batches", "logging",
                  "checkpoint", "run.overwrite", "train.threads", "train.keep_freed_memory", "parallel",
                  "train.zero_stage")


def _flatten(d: dict, prefix: str = "") -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_differences(old: Config, new: Config) -> list:
    a, b = _flatten(to_dict(old)), _flatten(to_dict(new))
    # 0 is "from the tokenizer": either side may hold the resolved value (the stored config after a
    # run started, the live one after the data was built), and it follows from the data keys anyway
    if b["model.vocab_size"] == 0:
        b["model.vocab_size"] = a.get("model.vocab_size")
    if a.get("model.vocab_size") == 0:
        a["model.vocab_size"] = b["model.vocab_size"]
    return sorted(k for k in set(a) | set(b)
                  if a.get(k) != b.get(k) and not any(k == r or k.startswith(r + ".") for r in RESUMABLE_KEYS))


def check_run_dir(cfg: Config) -> bool:
    """Whether runs/<name>/ must be moved aside before this run uses it; a ConfigError when it may
    not be used at all. Writes nothing (`moe launch` runs it before submitting).

    Refused without run.overwrite=true: a folder that holds a run with a different config, and
    checkpoint.resume=false on a folder that holds checkpoints (starting over would replace them)."""
    run_dir = os.path.join(cfg.run.root, cfg.run.name)
    cfg_path = os.path.join(run_dir, "config.yaml")
    steps = checkpoint.list_steps(os.path.join(run_dir, "checkpoints"))
    if not cfg.checkpoint.resume and steps:
        if not cfg.run.overwrite:
            raise ConfigError(
                f"checkpoint.resume=false, but {run_dir}/checkpoints holds checkpoints "
                f"({', '.join(checkpoint.step_tag(s) for s in steps[-3:])}): starting over would replace them; "
                f"pass run.overwrite=true to move the old run aside, or choose another run.name")
        return True
    if not os.path.isfile(cfg_path):
        return False
    try:
        diff = config_differences(config_from_yaml_text(open(cfg_path).read()), cfg)
    except ConfigError as exc:
        diff = [f"(unreadable: {exc})"]
    if diff and not cfg.run.overwrite:
        raise ConfigError(
            f"{run_dir} already holds a run with a different config (differs in: {', '.join(diff[:8])}); "
            f"choose another run.name or pass run.overwrite=true to move the old run aside")
    return bool(diff)


def prepare_run_dir(cfg: Config, is_writer: bool, defer_config: bool = False) -> str:
    """Create runs/<name>/, or reuse it when `check_run_dir` allows. Never deletes a previous run:
    with run.overwrite=true a refused old run is moved aside to <name>.old-<time>. `defer_config`
    leaves an existing folder's config.yaml for the caller to rewrite once resuming has worked."""
    run_dir = os.path.join(cfg.run.root, cfg.run.name)
    cfg_path = os.path.join(run_dir, "config.yaml")
    if check_run_dir(cfg):
        _move_aside(run_dir, is_writer)
    if is_writer:
        os.makedirs(run_dir, exist_ok=True)
        if not (defer_config and os.path.isfile(cfg_path)):  # train() rewrites it once resuming worked
            atomic_write(cfg_path, to_yaml(cfg))
    return run_dir


def _move_aside(run_dir: str, is_writer: bool) -> None:
    if not is_writer:
        return
    aside = f"{run_dir}.old-{time.strftime('%Y%m%d-%H%M%S')}"
    n = 1
    while os.path.exists(aside):  # two overwrites within a second must not collide
        aside, n = f"{run_dir}.old-{time.strftime('%Y%m%d-%H%M%S')}-{n}", n + 1
    os.replace(run_dir, aside)
    print(f"moved the previous run in {run_dir} to {aside}")


def rng_state() -> Dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@torch.no_grad()
def evaluate(engine, dataset, cfg: Config, dist_info, dtype) -> float:
    """Mean validation loss over the first eval_batches micro-batches of every rank (same each time)."""
    import torch.distributed as dist
    from moe.data import BatchSampler

    t = cfg.train
    sampler = BatchSampler(dataset, t.seq_len, t.micro_batch_size, dist_info.rank, dist_info.world_size,
                           seed=0, shuffle=False)
    engine.eval()
    total = torch.zeros(2, dtype=torch.float64)
    for _ in range(t.eval_batches):
        x, y = sampler.next_batch()
        with torch.autocast(dist_info.device.type, dtype=dtype, enabled=dtype != torch.float32):
            out = engine(x.to(dist_info.device), y.to(dist_info.device))
        total += torch.tensor([float(out.loss), 1.0], dtype=torch.float64)
    engine.train()
    dist.all_reduce(total)
    return float(total[0] / total[1])


class Periodic:
    """Decides which periodic work runs after a step: metrics, eval, checkpoint."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg

    def log(self, step: int) -> bool:
        return step % self.cfg.train.log_every == 0 or step == self.cfg.train.steps

    def eval(self, step: int) -> bool:
        every = self.cfg.train.eval_every
        return step == self.cfg.train.steps or (every > 0 and step % every == 0)

    def checkpoint(self, step: int) -> bool:
        c = self.cfg.checkpoint
        return (c.save_final and step == self.cfg.train.steps) or (c.every > 0 and step % c.every == 0)


class Preemption:
    """Stops the run cleanly when asked by a signal: SIGUSR2 is Slurm's warning before the time limit
    (`#SBATCH --signal=USR2@120`, or `scancel --signal=USR2 JOBID`); SIGTERM is a cancel, a time limit
    or a preemption; SIGINT (Ctrl-C) stops like SIGTERM, and a second Ctrl-C aborts at once.

    The handler only sets a flag. At each step boundary every rank learns whether any rank was
    signalled (one all-reduce, which also carries whether any rank's loss went non-finite), so all
    ranks stop after the same step; the loop then saves a checkpoint and ends. After USR2 under
    Slurm, rank 0 finally requeues the job (`scontrol requeue`), whose next start resumes from that
    checkpoint. SIGTERM and SIGINT never requeue: they are how `scancel`, time limits and a user end
    a job, and Slurm requeues preempted jobs itself.
    """

    USR2, TERM = 1, 2  # stop codes; TERM wins when both arrive, so a cancel never turns into a requeue
    NAMES = {USR2: "SIGUSR2", TERM: "SIGTERM"}

    def __init__(self) -> None:
        self.received = 0  # on this rank
        self.stopped = 0  # agreed by all ranks at the last step boundary
        self.interrupted = False
        self._previous: Dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGUSR2, signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame) -> None:
        if signum == signal.SIGINT:
            if self.interrupted:
                raise KeyboardInterrupt  # the second Ctrl-C: abort now, without saving
            self.interrupted = True
            if int(os.environ.get("RANK", "0")) == 0:
                print("\n[moe] Ctrl-C: saving a checkpoint after this step, then stopping (Ctrl-C again to abort "
                      "without saving)", flush=True)
        self.received = max(self.received, self.TERM if signum in (signal.SIGTERM, signal.SIGINT) else self.USR2)

    def signal_name(self) -> str:
        return "SIGINT" if self.interrupted and self.stopped == self.TERM else self.NAMES.get(self.stopped, "-")

    def requested(self, device: torch.device, diverged: bool = False):
        """(stop requested on any rank, loss non-finite on any rank). Collective: call on every rank
        at the same step boundary."""
        import torch.distributed as dist

        flags = [self.received, int(diverged)]
        if dist.is_initialized() and dist.get_world_size() > 1:
            t = torch.tensor(flags, dtype=torch.int32, device=device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flags = [int(v) for v in t.tolist()]
        self.stopped = flags[0]
        return flags[0] > 0, bool(flags[1])

    def finish(self, rank: int, step: int) -> None:
        """After the run's last write. Requeueing makes Slurm end this job at once, so it comes last."""
        job = os.environ.get("SLURM_JOB_ID")
        if self.stopped and rank == 0:
            print(f"[moe] stopped after step {step} on {self.signal_name()}; checkpoint saved", flush=True)
        if self.stopped == self.USR2 and job:
            if rank == 0:
                import sys

                if "wandb" in sys.modules:  # stop W&B's service now: the requeue ends every process of the job
                    sys.modules["wandb"].teardown()
                proc = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
                print(f"[moe] requeued Slurm job {job}" if proc.returncode == 0 else
                      f"[moe] scontrol requeue {job} failed: {proc.stderr.strip()}", flush=True)
            return  # keep the handlers: Slurm's SIGTERM for the requeue must not kill this exiting process
        self.restore()

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


@dataclass
class TrainingSetup:
    """What build_training makes: the processes' view, the data, the model and its DeepSpeed engine."""

    dist_info: Any
    data: Any
    model: GPT
    engine: Any
    optimizer: Any
    scheduler: Any
    dtype: torch.dtype
    accum: int
    """Micro-batches per optimizer step on each rank."""
    moe_layers: Dict[int, Any]
    """{block index: MoELayer}."""
    freed_memory_kept: bool
    """Whether the host-memory policy of train.keep_freed_memory is in effect (moe/train/host_memory.py)."""


def build_training(cfg: Config, world_size: int) -> TrainingSetup:
    """Threads, process group, seeds, data (resolving model.vocab_size from the tokenizer), model and
    DeepSpeed engine (expert parallelism applied there), in the one order every entry point uses:
    `moe train` and the `moe parity` workers, so parity checks exactly what training runs."""
    import torch.distributed as dist

    from moe import parallel
    from moe.data import prepare_data

    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    freed_memory_kept = cfg.train.keep_freed_memory and keep_freed_memory()
    dist_info = parallel.init_distributed(cfg.parallel.backend, cfg.parallel.timeout_s)
    seed_everything(cfg.run.seed)
    data = prepare_data(cfg.data, is_writer=dist_info.rank == 0, barrier=dist.barrier, seq_len=cfg.train.seq_len,
                        batch_sequences=cfg.train.micro_batch_size * world_size)
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = data.tokenizer.vocab_size
    elif cfg.model.vocab_size < data.tokenizer.vocab_size:
        raise ConfigError(f"model.vocab_size ({cfg.model.vocab_size}) is smaller than the tokenizer's "
                          f"vocabulary ({data.tokenizer.vocab_size})")
    model = GPT(cfg.model).to(dist_info.device)
    accum = grad_accum_steps(cfg, world_size)
    engine, optimizer, scheduler, dtype = parallel.build_engine(model, cfg, dist_info, accum)
    moe_layers = {b.layer_id: b.ffn for b in model.blocks if b.ffn in model.moe_layers()}
    return TrainingSetup(dist_info, data, model, engine, optimizer, scheduler, dtype, accum, moe_layers,
                         freed_memory_kept)


def train(cfg: Config) -> Dict[str, Any]:
    """Train (or resume) the run described by cfg; returns the summary written to summary.json.
    Raises TrainingDiverged (nothing saved, exit non-zero) when the loss or gradient norm stops
    being finite, and RunFolderBusy when another process tree trains in the same folder."""
    from moe import parallel

    # 1. everything that can fail cheaply fails before any heavy work or any write
    world_size = parallel.world_size_from_env()
    validate(cfg, world_size)
    is_writer = int(os.environ.get("RANK", "0")) == 0
    lock = RunLock(cfg.run.root, cfg.run.name)
    if is_writer:
        lock.acquire()  # one process tree per run folder, released by the kernel if this one dies
    try:
        return _train_locked(cfg, world_size, is_writer)
    finally:
        lock.release()


def _train_locked(cfg: Config, world_size: int, is_writer: bool) -> Dict[str, Any]:
    import torch.distributed as dist

    from moe import parallel
    from moe.data import BatchSampler
    from moe.parallel.expert import ep_metrics
    from moe.metrics import MetricLogger, measure_peak_flops, router_metrics
    from moe.train.step import optimizer_step

    preemption = Preemption()  # from here on, a signal stops the run at a step boundary
    check_run_dir(cfg)  # a folder that may not be used is refused before anything is built or written

    # 2. processes, data, model, engine (bad data fails here, before the run folder is touched)
    setup = build_training(cfg, world_size)
    run_dir = prepare_run_dir(cfg, is_writer, defer_config=True)
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    if is_writer:
        for name in checkpoint.remove_leftovers(ckpt_dir):  # of a killed save; we hold the lock
            print(f"[moe] removed {os.path.join(ckpt_dir, name)}, left by an interrupted save", flush=True)
    dist_info, data, model, engine = setup.dist_info, setup.data, setup.model, setup.engine
    optimizer, scheduler, dtype, accum, moe_layers = (setup.optimizer, setup.scheduler, setup.dtype, setup.accum,
                                                     setup.moe_layers)
    rank = dist_info.rank
    params = count_params(model)
    flops = flops_per_token(cfg.model, cfg.train.seq_len)
    tokens_per_step = global_batch_size(cfg, world_size) * cfg.train.seq_len

    # 3. resume
    sampler = BatchSampler(data.train, cfg.train.seq_len, cfg.train.micro_batch_size, rank, world_size,
                           seed=cfg.run.seed)
    state, tag = _resume(cfg, engine, optimizer, scheduler, sampler, ckpt_dir, rank)
    resumed = tag is not None
    if rank == 0:  # only now: a checkpoint that cannot be resumed leaves the folder as it was
        data.tokenizer.save(run_dir)
        atomic_write(os.path.join(run_dir, "config.yaml"), to_yaml(cfg))  # with the resolved vocab size
    if rank == 0:
        _banner(cfg, run_dir, params, flops, tokens_per_step, world_size, accum, dist_info, model, moe_layers,
                setup.freed_memory_kept, tag)
    logger = None
    if rank == 0:
        logger = MetricLogger(run_dir, cfg, to_dict(cfg), state["step"] if resumed else None, state.get("wandb_id"))
    peak = measure_peak_flops(dist_info.device, dtype) * world_size
    summary: Dict[str, Any] = {"name": cfg.run.name, "model_type": "moe" if moe_layers else "dense",
                               "status": "running", **params, **flops, "tokens_per_step": tokens_per_step}
    _write_summary(run_dir, summary, rank)

    # 4. the loop
    periodic = Periodic(cfg)
    progress = None
    if rank == 0 and cfg.logging.progress:
        from tqdm import tqdm

        progress = tqdm(total=cfg.train.steps, initial=state["step"], desc=cfg.run.name, dynamic_ncols=True,
                        mininterval=2.0)
    train_loss = val_loss = grad_norm = float("nan")
    window_loss, window_steps, window_t0 = 0.0, 0, time.perf_counter()
    engine.train()
    try:
        while state["step"] < cfg.train.steps:
            result = optimizer_step(engine, model, sampler.next_batch, accum, dist_info.device, dtype)
            step_loss, grad_norm = result.loss, result.grad_norm
            state["step"] += 1
            state["tokens"] += tokens_per_step
            state["flops"] += tokens_per_step * flops["flops_per_token"]
            window_loss += step_loss
            window_steps += 1
            step = state["step"]
            # a signal or a non-finite loss on any rank stops every rank here, after the same step
            stop, diverged = preemption.requested(dist_info.device, not _finite(step_loss, grad_norm))
            if diverged:
                raise TrainingDiverged(_diverged_message(step, step_loss, grad_norm, ckpt_dir))

            if periodic.log(step):
                loss_t = torch.tensor([window_loss / window_steps], dtype=torch.float64)
                dist.all_reduce(loss_t)
                train_loss = float(loss_t) / world_size
                elapsed = time.perf_counter() - window_t0
                state["wall_s"] += elapsed
                tps = window_steps * tokens_per_step / elapsed
                record = {"step": step, "tokens": state["tokens"], "flops": state["flops"],
                          "loss/train": train_loss, "lr": scheduler.get_last_lr()[0],
                          "grad_norm": grad_norm, "speed/tokens_per_s": tps,
                          "speed/mfu": tps * flops["flops_per_token"] / peak, **router_metrics(moe_layers),
                          **ep_metrics(model, window_steps, elapsed)}
                if logger:
                    logger.log(record)
                if progress:
                    progress.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{tps:,.0f}")
                window_loss, window_steps, window_t0 = 0.0, 0, time.perf_counter()
            if periodic.eval(step):
                t0 = time.perf_counter()
                val_loss = evaluate(engine, data.val, cfg, dist_info, dtype)
                if not math.isfinite(val_loss):
                    raise TrainingDiverged(f"step {step}: the validation loss is {val_loss}; stopped without saving "
                                           f"({_last_good(ckpt_dir)})")
                if logger:
                    logger.log({"step": step, "tokens": state["tokens"], "flops": state["flops"],
                                "loss/val": val_loss, "ppl/val": math.exp(min(val_loss, 50))})
                window_t0 += time.perf_counter() - t0  # eval time is not training throughput
            if periodic.checkpoint(step) or stop:
                t0 = time.perf_counter()
                state["sampler"] = sampler.state_dict()
                state["rng"] = rng_state()
                state["wandb_id"] = logger.wandb_id if logger else None
                checkpoint.save(engine, ckpt_dir, step, state, to_yaml(cfg), cfg.checkpoint.keep_last, rank)
                window_t0 += time.perf_counter() - t0
            if progress:
                progress.update(1)
            if stop:
                break
    except BaseException as exc:
        preemption.restore()
        summary["status"] = "failed"
        summary["reason"] = _failure_reason(exc)
        _write_summary(run_dir, summary, rank)
        if logger:
            logger.close()
        failure = parallel.collective_failure(exc, rank, world_size, cfg.parallel.timeout_s)
        if failure:  # a dead or stuck peer: say which collective, on which rank
            from moe.parallel.expert import CollectiveError

            raise CollectiveError(failure) from exc
        raise
    finally:
        if progress:
            progress.close()

    summary.update({"status": "preempted" if preemption.stopped else "finished",
                    "train_loss": train_loss, "val_loss": val_loss,
                    "val_ppl": math.exp(min(val_loss, 50)), "tokens": state["tokens"], "steps": state["step"],
                    "training_flops": state["flops"], "wall_s": state["wall_s"],
                    "tokens_per_s": state["tokens"] / state["wall_s"] if state["wall_s"] > 0 else float("nan")})
    if preemption.stopped:
        summary["reason"] = f"stopped on {preemption.signal_name()} after step {state['step']}; checkpoint saved"
    _write_summary(run_dir, summary, rank)
    if logger:
        logger.summary(summary)
        logger.close()
        print(f"[moe] {cfg.run.name}: train loss {train_loss:.4f}, val loss {val_loss:.4f}, "
              f"{summary['tokens_per_s']:,.0f} tokens/s -> {run_dir}", flush=True)
    parallel.shutdown_distributed()
    preemption.finish(rank, state["step"])
    return summary


def _resume(cfg: Config, engine, optimizer, scheduler, sampler, ckpt_dir: str, rank: int):
    """(train state, tag resumed from or None). `latest`, or with it missing or dangling the newest
    verified step folder (said on rank 0); the checkpoint is verified before anything is restored."""
    state: Dict[str, Any] = {"step": 0, "tokens": 0, "flops": 0.0, "wall_s": 0.0, "wandb_id": None}
    if not cfg.checkpoint.resume:
        return state, None
    tag, note = checkpoint.find_resume(ckpt_dir)
    if tag is None:
        return state, None
    if note and rank == 0:
        print(f"[moe] {note}", flush=True)
    state = checkpoint.load(engine, ckpt_dir, tag)
    # The optimizer restores the LR it last used, which came from the schedule of the saved run;
    # recompute it from this run's schedule so that extending train.steps continues correctly.
    for group, lr in zip(optimizer.param_groups, [base * scheduler.lr_lambdas[0](scheduler.last_epoch)
                                                  for base in scheduler.base_lrs]):
        group["lr"] = lr
    sampler.load_state_dict(state["sampler"])
    set_rng_state(state["rng"])
    return state, tag


def _banner(cfg, run_dir, params, flops, tokens_per_step, world_size, accum, dist_info, model, moe_layers,
            freed_memory_kept, tag) -> None:
    kind = "moe" if moe_layers else "dense"
    print(f"[moe] run {cfg.run.name} ({kind}) in {run_dir}: params total {params['params_total']:,}, "
          f"active {params['params_active']:,}, training FLOPs/token {flops['flops_per_token']:.3e}, "
          f"{tokens_per_step} tokens/step, world {world_size}, grad accum {accum}, device {dist_info.device}, "
          f"dispatch {model.moe_layers()[0].dispatch_backend if moe_layers else '-'}, "
          f"freed host memory {'kept for reuse' if freed_memory_kept else 'returned to the OS'}"
          + ("; blocks torch.compile-d (the first step and the first evaluation compile)" if cfg.train.compile
             else "")
          + (f"; resuming from {tag}" if tag else ""), flush=True)


def _finite(*values: float) -> bool:
    return all(math.isfinite(v) for v in values if v is not None)


def _last_good(ckpt_dir: str) -> str:
    tag, _ = checkpoint.read_latest(ckpt_dir)
    return f"the last checkpoint, {os.path.join(ckpt_dir, tag)}, is untouched" if tag else "no checkpoint was saved"


def _diverged_message(step: int, loss: float, grad_norm: float, ckpt_dir: str) -> str:
    return (f"step {step}: non-finite training (loss {loss}, gradient norm {grad_norm}; on some rank); stopped "
            f"without saving ({_last_good(ckpt_dir)}). Check train.lr, model.norm_eps, model.rope_theta, "
            f"the data, or resume from the last checkpoint with a lower learning rate")


def _failure_reason(exc: BaseException) -> str:
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted (KeyboardInterrupt)"
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}"[:500]


def _write_summary(run_dir: str, summary: Dict[str, Any], rank: int) -> None:
    if rank != 0:
        return
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in summary.items()}
    atomic_write(os.path.join(run_dir, "summary.json"), json.dumps(clean, indent=2))
