"""The training loop: config -> run folder -> processes, data, model, engine -> resume -> steps -> summary.

`train()` reads as its ten steps; `_Run` holds what the loop carries from step to step (the train
state, the metrics window, the logger) and does the periodic work after a step: metrics, evaluation,
checkpoint. Everything needed to resume is in the train state saved with each checkpoint
(moe/train/resume.py), so running the same command again continues where the last checkpoint left off.
"""
from __future__ import annotations

import math
import os
import time
from typing import Any, Dict, Optional

import numpy as np
import torch
import torch.distributed as dist

from moe import parallel
from moe.config import Config, global_batch_size, to_dict, to_yaml
from moe.data import make_sampler
from moe.errors import TrainingDiverged
from moe.io import RunFolder, RunLock, atomic_write
from moe.metrics import (MetricLogger, domain_metrics, measure_peak_flops, router_metrics, set_token_sources,
                         source_metrics)
from moe.nn.accounting import flops_per_token, param_counts
from moe.parallel import CollectiveError, ep_metrics
from moe.train.checkpoint import folders, saving
from moe.train.build import TrainingSetup, build_training
from moe.train.downstream import InLoopTasks
from moe.train.evaluate import evaluate, evaluate_sources
from moe.train.plan import startup_line
from moe.train.preemption import JobControl, Preemption
from moe.train.resume import resume, rng_state
from moe.train.run_dir import check_run_dir, prepare_run_dir, write_summary
from moe.train.step import optimizer_step
from moe.validate import validate


def train(cfg: Config, launcher: Optional[JobControl] = None) -> Dict[str, Any]:
    """Train (or resume) the run described by cfg; returns the summary written to summary.json.
    `launcher` says what happens after a preemption warning (moe.launch.job_launcher(); None: the
    run just stops). Raises TrainingDiverged (nothing saved, exit non-zero) when the loss or gradient
    norm stops being finite, and RunFolderBusy when another process tree trains in the same folder."""
    # 1. everything that can fail cheaply fails before any heavy work or any write
    world_size = parallel.world_size_from_env()
    validate(cfg, world_size)
    is_writer = int(os.environ.get("RANK", "0")) == 0
    # 2. one process tree per run folder, released by the kernel if this one dies
    lock = RunLock(cfg.run.root, cfg.run.name)
    if is_writer:
        lock.acquire()
    try:
        return _train_locked(cfg, world_size, is_writer, launcher)
    finally:
        lock.release()


def _train_locked(cfg: Config, world_size: int, is_writer: bool, launcher: Optional[JobControl]) -> Dict[str, Any]:
    preemption = Preemption(launcher)  # 3. from here on, a signal stops the run at a step boundary
    check_run_dir(cfg)  # 4. a folder that may not be used is refused before anything is built or written
    t = cfg.train  # an unknown train.eval_tasks name fails here too
    tasks = InLoopTasks(t.eval_tasks, t.eval_tasks_limit, t.eval_include_path, t.micro_batch_size)
    setup = build_training(cfg, world_size)  # 5. processes, data, model, engine (bad data fails here)
    run = _Run(cfg, setup, world_size, prepare_run_dir(cfg, is_writer, defer_config=True))  # 6. the folder
    run.tasks = tasks
    run.resume()  # 7. from the newest verified checkpoint, if any
    run.start()  # 8. tokenizer, config, banner, metrics logger, summary "running"
    try:
        run.loop(preemption)  # 9. the steps, until train.steps or a stop
    except BaseException as exc:
        preemption.restore()
        run.fail(exc)
        raise
    summary = run.finish(preemption)  # 10. summary, W&B, process group, and the launcher's answer
    preemption.finish(run.rank, run.state["step"])
    return summary


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


class _Run:
    """One run's loop state; each method is one of train()'s steps or one piece of periodic work."""

    def __init__(self, cfg: Config, setup: TrainingSetup, world_size: int, run_dir: str) -> None:
        self.cfg, self.setup, self.world_size, self.run_dir = cfg, setup, world_size, run_dir
        self.folder = RunFolder(run_dir)
        self.rank = setup.dist_info.rank
        # from the config on the meta device, not from setup.model: under expert parallelism a rank holds
        # only its own experts, and the banner and summary report the whole model
        self.params = {k: v for k, v in param_counts(cfg.model).items() if k != "params_expert"}
        self.flops = flops_per_token(cfg.model, cfg.train.seq_len)
        self.tokens_per_step = global_batch_size(cfg, world_size) * cfg.train.seq_len
        self.sampler = make_sampler(setup.data, cfg.train.seq_len, cfg.train.micro_batch_size, self.rank,
                                    world_size, seed=cfg.run.seed)  # a MixtureSampler over data.sources
        self.periodic = Periodic(cfg)
        self.tasks: Optional[InLoopTasks] = None  # train.eval_tasks, run at each evaluation
        self.logger: Optional[MetricLogger] = None
        self.progress = None
        self.state: Dict[str, Any] = {}
        self.tag: Optional[str] = None
        self.summary: Dict[str, Any] = {}
        self.train_loss = self.val_loss = self.grad_norm = float("nan")
        self.window_loss, self.window_steps, self.window_t0 = 0.0, 0, time.perf_counter()
        self.window_source_tokens = np.zeros(len(setup.data.sources), dtype=np.int64)  # this rank's draws
        if self.rank == 0:
            for name in folders.remove_leftovers(self.folder.checkpoints):  # of a killed save; we hold the lock
                print(f"[moe] removed {os.path.join(self.folder.checkpoints, name)}, left by an interrupted save",
                      flush=True)

    def resume(self) -> None:
        s = self.setup
        self.state, self.tag = resume(self.cfg, s.engine, s.optimizer, s.scheduler, self.sampler,
                                      self.folder.checkpoints, self.rank)
        if s.data.sources and "source_tokens" not in self.state:  # a new run, or a checkpoint from before
            # the counts were kept: what the stream handed out up to the saved position
            self.state["source_tokens"] = self.sampler.tokens_drawn()

    def start(self) -> None:
        cfg, s = self.cfg, self.setup
        if self.rank == 0:  # only now: a checkpoint that cannot be resumed leaves the folder as it was
            s.data.tokenizer.save(self.run_dir)
            atomic_write(self.folder.config, to_yaml(cfg))  # with the resolved vocab size
            print(banner(cfg, self.run_dir, self.params, self.flops, self.tokens_per_step, self.world_size, s,
                         self.tag), flush=True)
            print(startup_line(cfg, self.world_size, s.dist_info.device), flush=True)  # moe plan's estimate
            self.logger = MetricLogger(self.run_dir, cfg, to_dict(cfg), self.state["step"] if self.tag else None,
                                       self.state.get("wandb_id"))
        self.peak = measure_peak_flops(s.dist_info.device, s.dtype) * self.world_size
        self.summary = {"name": cfg.run.name, "model_type": "moe" if s.moe_layers else "dense", "status": "running",
                        **self.params, **self.flops, "tokens_per_step": self.tokens_per_step}
        write_summary(self.run_dir, self.summary, self.rank)
        if self.rank == 0 and cfg.logging.progress:
            from tqdm import tqdm  # deferred: only rank 0 with a progress bar needs it

            self.progress = tqdm(total=cfg.train.steps, initial=self.state["step"], desc=cfg.run.name,
                                 dynamic_ncols=True, mininterval=2.0)

    def loop(self, preemption: Preemption) -> None:
        s, state = self.setup, self.state
        self.window_t0 = time.perf_counter()
        s.engine.train()
        try:
            while state["step"] < self.cfg.train.steps:
                result = optimizer_step(s.engine, s.model, self.next_batch, s.accum, s.dist_info.device,
                                        s.dtype)
                step_loss, self.grad_norm = result.loss, result.grad_norm
                state["step"] += 1
                state["tokens"] += self.tokens_per_step
                state["flops"] += self.tokens_per_step * self.flops["flops_per_token"]
                self.window_loss += step_loss
                self.window_steps += 1
                # a signal or a non-finite loss on any rank stops every rank here, after the same step
                stop, diverged = preemption.requested(s.dist_info.device, not _finite(step_loss, self.grad_norm))
                if diverged:
                    raise TrainingDiverged(_diverged_message(state["step"], step_loss, self.grad_norm,
                                                             self.folder.checkpoints))
                self.after_step(state["step"], stop)
                if self.progress:
                    self.progress.update(1)
                if stop:
                    break
        finally:
            if self.progress:
                self.progress.close()

    def next_batch(self):
        """The sampler's next micro-batch; for a mixture, its tokens' sources tagged for routing by domain."""
        x, y = self.sampler.next_batch()
        if self.setup.data.sources:
            np.add.at(self.window_source_tokens, self.sampler.last_sources, x.shape[1])
        if self.setup.data.sources and self.setup.moe_layers:
            set_token_sources(self.setup.moe_layers, self.sampler.last_sources, x.shape[1],
                              len(self.setup.data.sources))
        return x, y

    def after_step(self, step: int, stop: bool) -> None:
        if self.periodic.log(step):
            self.log_window(step)
        if self.periodic.eval(step):
            t0 = time.perf_counter()
            self.evaluate(step)
            self.window_t0 += time.perf_counter() - t0  # eval time is not training throughput
        if self.periodic.checkpoint(step) or stop:
            t0 = time.perf_counter()
            self.save(step)
            self.window_t0 += time.perf_counter() - t0

    def log_window(self, step: int) -> None:
        """The train record of the steps since the last one: mean loss over ranks, speed, router stats."""
        s, state = self.setup, self.state
        # one all-reduce: the window's mean loss and, for a mixture, the tokens every rank drew per source
        summed = torch.tensor([self.window_loss / self.window_steps, *self.window_source_tokens], dtype=torch.float64)
        dist.all_reduce(summed)
        self.train_loss = float(summed[0]) / self.world_size
        sources = [src.name for src in s.data.sources]
        for name, drawn in zip(sources, summed[1:].tolist()):
            state["source_tokens"][name] += int(drawn)
        self.window_source_tokens[:] = 0
        elapsed = time.perf_counter() - self.window_t0
        state["wall_s"] += elapsed
        tps = self.window_steps * self.tokens_per_step / elapsed
        record = {"step": step, "tokens": state["tokens"], "flops": state["flops"],
                  "loss/train": self.train_loss, "lr": s.scheduler.get_last_lr()[0],
                  "grad_norm": self.grad_norm, "speed/tokens_per_s": tps,
                  "speed/mfu": tps * self.flops["flops_per_token"] / self.peak, **router_metrics(s.moe_layers), **domain_metrics(s.moe_layers, sources),
                  **source_metrics(state.get("source_tokens", {})), **ep_metrics(s.model, self.window_steps, elapsed)}
        if self.logger:
            self.logger.log(record)
        if self.progress:
            self.progress.set_postfix(loss=f"{self.train_loss:.3f}", tok_s=f"{tps:,.0f}")
        self.window_loss, self.window_steps, self.window_t0 = 0.0, 0, time.perf_counter()

    def evaluate(self, step: int) -> None:
        s = self.setup
        if s.data.sources:  # a mixture: loss/val/<source> and their weighted mean
            self.val_loss, per_source = evaluate_sources(s.engine, s.data, self.cfg, s.dist_info, s.dtype)
        else:
            self.val_loss, per_source = evaluate(s.engine, s.data.val, self.cfg, s.dist_info, s.dtype), {}
        if not math.isfinite(self.val_loss):
            raise TrainingDiverged(f"step {step}: the validation loss is {self.val_loss}; stopped without saving "
                                   f"({_last_good(self.folder.checkpoints)})")
        record = {"step": step, "tokens": self.state["tokens"], "flops": self.state["flops"],
                  "loss/val": self.val_loss, "ppl/val": math.exp(min(self.val_loss, 50)), **per_source}
        if self.tasks:  # every rank, in lockstep: a forward may be a collective (expert parallelism)
            s.engine.eval()
            try:
                record.update(self.tasks.run(s.engine, self.cfg.model, s.data.tokenizer, s.dtype))
            finally:
                s.engine.train()
        if self.logger:
            self.logger.log(record)

    def save(self, step: int) -> None:
        state = self.state
        state["sampler"] = self.sampler.state_dict()
        state["rng"] = rng_state()
        state["wandb_id"] = self.logger.wandb_id if self.logger else None
        saving.save(self.setup.engine, self.folder.checkpoints, step, state, to_yaml(self.cfg),
                        self.cfg.checkpoint.keep_last, self.rank)

    def fail(self, exc: BaseException) -> None:
        """summary.json says why; a dead or stuck peer becomes a CollectiveError naming the collective."""
        self.summary["status"] = "failed"
        self.summary["reason"] = _failure_reason(exc)
        write_summary(self.run_dir, self.summary, self.rank)
        if self.logger:
            self.logger.close()
        failure = parallel.collective_failure(exc, self.rank, self.world_size, self.cfg.parallel.timeout_s)
        if failure:
            raise CollectiveError(failure) from exc

    def finish(self, preemption: Preemption) -> Dict[str, Any]:
        state, summary = self.state, self.summary
        summary.update({"status": "preempted" if preemption.stopped else "finished",
                        "train_loss": self.train_loss, "val_loss": self.val_loss,
                        "val_ppl": math.exp(min(self.val_loss, 50)), "tokens": state["tokens"], "steps": state["step"],
                        "training_flops": state["flops"], "wall_s": state["wall_s"],
                        "tokens_per_s": state["tokens"] / state["wall_s"] if state["wall_s"] > 0 else float("nan")})
        if preemption.stopped:
            summary["reason"] = f"stopped on {preemption.signal_name()} after step {state['step']}; checkpoint saved"
        write_summary(self.run_dir, summary, self.rank)
        if self.logger:
            self.logger.summary(summary)
            self.logger.close()
            print(f"[moe] {self.cfg.run.name}: train loss {self.train_loss:.4f}, val loss {self.val_loss:.4f}, "
                  f"{summary['tokens_per_s']:,.0f} tokens/s -> {self.run_dir}", flush=True)
        parallel.shutdown_distributed()
        return summary


def banner(cfg: Config, run_dir: str, params: dict, flops: dict, tokens_per_step: int, world_size: int,
           setup: TrainingSetup, tag: Optional[str]) -> str:
    """The one line rank 0 prints before the first step: sizes, layout, backends, resume point."""
    moe_layers, model = setup.moe_layers, setup.model
    kind = "moe" if moe_layers else "dense"
    return (f"[moe] run {cfg.run.name} ({kind}) in {run_dir}: params total {params['params_total']:,}, "
            f"active {params['params_active']:,}, training FLOPs/token {flops['flops_per_token']:.3e}, "
            f"{tokens_per_step} tokens/step, world {world_size}, grad accum {setup.accum}, "
            f"device {setup.dist_info.device}, "
            f"dispatch {model.moe_layers()[0].dispatch_backend if moe_layers else '-'}, "
            f"freed host memory {'kept for reuse' if setup.freed_memory_kept else 'returned to the OS'}"
            + ("; blocks torch.compile-d (the first step and the first evaluation compile)" if cfg.train.compile
               else "")
            + (f"; resuming from {tag}" if tag else ""))


def _finite(*values: float) -> bool:
    return all(math.isfinite(v) for v in values if v is not None)


def _last_good(ckpt_dir: str) -> str:
    tag, _ = folders.read_latest(ckpt_dir)
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
