"""Downstream evaluation through lm-eval-harness: our GPT as an `lm_eval` model, task lookup, and the
run of chosen tasks that `moe eval --tasks` and the training loop (`train.eval_tasks`) share.

The adapter (`lm_eval_model`, registered in lm_eval as "moe") scores what lm-eval's own Hugging Face
model scores: `loglikelihood` is the summed log-probability of the continuation tokens given the
context (context + continuation cut from the left to `max_seq_len` + 1 tokens, batched, right-padded),
`loglikelihood_rolling` sums disjoint windows of a whole text (lm-eval's `get_rolling_token_windows`),
and `generate_until` decodes with our KV cache, greedy unless `do_sample`, stopping at EOS, after
`max_gen_toks` or at the first stop string. The pure-PyTorch pieces (`score`, `generate`) take any
callable model; lm_eval itself (optional: `pip install moe[eval]`, seconds to import) is imported only
inside the functions that need it.

With several processes (the training loop) every rank runs the same requests in lockstep: with expert
parallelism or ZeRO-3 a forward is a collective, so no rank can score alone. Each generated token is
broadcast from rank 0 so that every rank stops after the same number of forwards.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

from moe.config import ConfigError, ModelConfig, attention_heads
from moe.errors import DataError
from moe.nn.gpt import KVCache

ADAPTER_NAME = "moe"
"""The name our model is registered under in lm_eval's model registry."""
PAD_ID = 0
"""Right padding of a batch (what lm-eval's HF model pads with; causal attention never reads it)."""
PREFIX = "downstream"
"""Metric keys: downstream/<task>/<metric>."""


@torch.no_grad()
def score(model: Callable, pairs: Sequence[Tuple[List[int], List[int]]], max_len: int,
          batch_size: int = 16) -> List[Tuple[float, bool]]:
    """(log-probability of the continuation, whether greedy decoding gives it) for each (context ids,
    continuation ids); `model(x)` returns logits [B, S, V] (or an output with `.logits`). The input is
    (context + continuation)[-(max_len + 1):][:-1]: a pair longer than the model's window loses its
    oldest context tokens. Longest first, `batch_size` at a time; results in the order given."""
    for _, cont in pairs:
        if not 0 < len(cont) <= max_len:
            raise DataError(f"a continuation of {len(cont)} tokens: lm-eval scores 1 to max_seq_len={max_len}")
    order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
    out: List[Tuple[float, bool]] = [(0.0, False)] * len(pairs)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        inputs = [(pairs[i][0] + pairs[i][1])[-(max_len + 1):][:-1] for i in chunk]
        width = max(len(ids) for ids in inputs)
        x = torch.full((len(chunk), width), PAD_ID, dtype=torch.long)
        for row, ids in enumerate(inputs):
            x[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        logits = _logits(model(x.to(_device(model))))
        logprobs = F.log_softmax(logits.float(), dim=-1).cpu()
        for row, i in enumerate(chunk):
            cont = pairs[i][1]
            end = len(inputs[row])
            lp = logprobs[row, end - len(cont):end]
            target = torch.tensor(cont, dtype=torch.long)
            out[i] = (float(lp.gather(1, target[:, None]).sum()), bool((lp.argmax(-1) == target).all()))
    return out


@torch.no_grad()
def generate(model: Callable, cfg: ModelConfig, prompt: List[int], max_new: int, stop_id: Optional[int] = None,
             temperature: float = 0.0, seed: int = 0, done: Optional[Callable[[List[int]], bool]] = None) -> List[int]:
    """Up to `max_new` tokens after `prompt` (its last max_seq_len - max_new tokens), one forward per
    token with a KV cache; greedy at temperature 0; ends after `stop_id` or once `done(new tokens)`.
    `model(x, cache=, start_pos=)` as GPT's forward. Under torch.distributed each token is rank 0's,
    so that every rank runs the same forwards."""
    if max_new < 1 or max_new >= cfg.max_seq_len:
        raise ConfigError(f"max_gen_toks={max_new}: must be >= 1 and below model.max_seq_len={cfg.max_seq_len}")
    prompt = prompt[-(cfg.max_seq_len - max_new):]
    device = _device(model)
    _, n_kv, head_dim = attention_heads(cfg)
    cache = KVCache(cfg.n_layers, 1, n_kv, len(prompt) + max_new, head_dim, device, _dtype(model))
    gen = torch.Generator().manual_seed(seed)
    logits = _logits(model(torch.tensor([prompt], device=device), cache=cache, start_pos=0))[0, -1]
    new: List[int] = []
    while True:
        if temperature > 0:
            token = int(torch.multinomial(torch.softmax(logits.float().cpu() / temperature, -1), 1, generator=gen))
        else:
            token = int(logits.argmax())
        token = _from_rank0(token, device)
        new.append(token)
        if token == stop_id or len(new) >= max_new or (done is not None and done(new)):
            return new
        logits = _logits(model(torch.tensor([[token]], device=device), cache=cache,
                               start_pos=len(prompt) + len(new) - 1))[0, -1]


def cut_at_stops(text: str, stops: Sequence[str]) -> str:
    """`text` up to the first occurrence of any stop string."""
    cut = len(text)
    for s in stops:
        if s:
            at = text.find(s)
            if at >= 0:
                cut = min(cut, at)
    return text[:cut]


def _logits(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out


def _first_param(model):
    return next(iter(model.parameters()))


def _device(model) -> torch.device:
    return _first_param(model).device


def _dtype(model) -> torch.dtype:
    return _first_param(model).dtype


def _from_rank0(token: int, device) -> int:
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return token
    t = torch.tensor([token], dtype=torch.long, device=device)
    dist.broadcast(t, src=0)
    return int(t)


@functools.lru_cache(maxsize=None)
def adapter_class():
    """The lm_eval model class (made on first use: lm_eval is imported here), registered as "moe"."""
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import MODEL_REGISTRY, register_model
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    class MoeLM(TemplateLM):
        """Our GPT for lm-eval. `model` is a GPT (or an engine wrapping one), `tokenizer` a moe.data
        Tokenizer; `autocast` a dtype to run the forwards under (None: the model's own)."""

        backend = "causal"

        def __init__(self, model, cfg: ModelConfig, tokenizer, batch_size: int = 16,
                     autocast: Optional[torch.dtype] = None) -> None:
            super().__init__()
            self.model, self.cfg, self.tok, self.batch_size = model, cfg, tokenizer, batch_size
            self.max_length = cfg.max_seq_len
            self.autocast = autocast

        @property
        def eot_token_id(self) -> int:
            return self.tok.eos_id

        def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> List[int]:
            return self.tok.encode(string)

        def _forward(self):
            device = _device(self.model)
            if self.autocast is None or self.autocast == torch.float32:
                return contextlib.nullcontext()
            return torch.autocast(device.type, dtype=self.autocast)

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
            with self._forward():
                return score(self.model, [(ctx, cont) for _, ctx, cont in requests], self.max_length,
                             self.batch_size)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> List[float]:
            windows, owner = [], []
            for i, req in enumerate(requests):
                ids = self.tok_encode(req.args[0])
                for w in get_rolling_token_windows(token_list=ids, prefix_token=self.prefix_token_id,
                                                   max_seq_len=self.max_length, context_len=1):
                    windows.append(make_disjoint_window(w))
                    owner.append(i)
            with self._forward():
                scored = score(self.model, windows, self.max_length, self.batch_size)
            totals = [0.0] * len(requests)
            for i, (lp, _) in zip(owner, scored):
                totals[i] += lp
            return totals

        def generate_until(self, requests, disable_tqdm: bool = False) -> List[str]:
            out = []
            for req in requests:
                context, kwargs = req.args
                kwargs = dict(kwargs or {})
                until = kwargs.get("until") or []
                until = [until] if isinstance(until, str) else list(until)
                temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
                max_new = int(kwargs.get("max_gen_toks", 256))

                def done(ids, until=until):
                    return any(s and s in self.tok.decode(ids) for s in until)

                with self._forward():
                    ids = generate(self.model, self.cfg, self.tok_encode(context), max_new, self.eot_token_id,
                                   temperature, int(kwargs.get("seed", 0)), done)
                if ids and ids[-1] == self.eot_token_id:
                    ids = ids[:-1]
                out.append(cut_at_stops(self.tok.decode(ids), until))
            return out

    if ADAPTER_NAME not in MODEL_REGISTRY:
        register_model(ADAPTER_NAME)(MoeLM)
    return MoeLM


def lm_eval_model(model, cfg: ModelConfig, tokenizer, batch_size: int = 16, autocast: Optional[torch.dtype] = None):
    """Our model as an lm_eval `LM` (a `TemplateLM`)."""
    return adapter_class()(model, cfg, tokenizer, batch_size, autocast)


def resolve_tasks(names: Sequence[str], include_path: str = "", what: str = "--tasks"):
    """(lm_eval TaskManager, task names) for `names`: task, group or tag names, or paths to a task's
    YAML file. Names are looked up in `include_path` (a folder of task YAML files) first; only a name
    not found there makes lm-eval index its own few thousand tasks (seconds). ConfigError naming the
    first name found nowhere (`what` names the flag or key it came from), before any model is loaded."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ConfigError(f"{what} needs lm-eval-harness: pip install 'moe[eval]'") from None
    if not names:
        raise ConfigError(f"{what}: no task named")
    paths = []
    if include_path:
        if not os.path.isdir(include_path):
            raise ConfigError(f"{include_path}: not a folder of task YAML files (the task include path)")
        paths.append(os.path.abspath(include_path))
    files = {n: os.path.abspath(n) for n in names if n.endswith((".yaml", ".yml"))}
    for name, path in files.items():
        if not os.path.isfile(path):
            raise ConfigError(f"{what}: task file {name} not found")
        paths.append(os.path.dirname(path))
    local = TaskManager(include_path=sorted(set(paths)), include_defaults=False) if paths else None
    resolved = []
    for name in names:
        if name in files:
            found = [e.name for e in local.task_index.values()
                     if e.yaml_path is not None and os.path.abspath(e.yaml_path) == files[name]]
            if not found:
                raise ConfigError(f"{what}: {name} declares no task lm-eval can read (no `task:` key)")
            name = found[0]
        resolved.append(name)
    if local is not None and all(n in local.task_index for n in resolved):
        return local, resolved
    manager = TaskManager(include_path=sorted(set(paths)) or None)  # lm-eval's own tasks too
    for name in resolved:
        if name not in manager.task_index:
            where = f"in {include_path} nor " if include_path else ""
            raise ConfigError(f"{what}: task {name!r} not found {where}among lm-eval's {len(manager.all_tasks)} "
                              f"tasks, groups and tags")
    return manager, resolved


def run_tasks(lm, manager, names: Sequence[str], limit: Optional[float] = None, num_fewshot: Optional[int] = None,
              seeded: bool = True) -> Dict[str, Any]:
    """lm-eval's `simple_evaluate` of `names` on `lm`: {"metrics": {task: {metric: value}}, "samples":
    {task: n}}. No bootstrap stderr. `seeded=False` leaves the global random, numpy and torch
    generators alone (the training loop's); few-shot examples are drawn with lm-eval's fixed seed
    either way. A task whose data cannot be read is a DataError naming the tasks. Where LOCAL_RANK is
    not 0 the requests run all the same, but lm-eval returns no results: empty dicts."""
    from lm_eval import simple_evaluate

    seeds = {} if seeded else dict(random_seed=None, numpy_random_seed=None, torch_random_seed=None)
    try:
        with _quiet():
            results = simple_evaluate(model=lm, tasks=list(names), task_manager=manager, limit=limit or None,
                                      num_fewshot=num_fewshot, bootstrap_iters=0, log_samples=False, **seeds)
    except OSError as exc:  # the hub unreachable or offline, a data file missing
        raise DataError(f"tasks {', '.join(names)}: their data could not be read: {exc}") from None
    if results is None:  # lm-eval returns the results only where LOCAL_RANK is 0 (the others ran the same requests)
        return {"metrics": {}, "samples": {}}
    return {"metrics": task_metrics(results["results"]),
            "samples": {t: n.get("effective", n.get("original")) for t, n in results.get("n-samples", {}).items()}}


@contextlib.contextmanager
def _quiet():
    """lm-eval's info lines and the datasets progress bars off while the tasks run."""
    import datasets

    logger = logging.getLogger("lm_eval")
    level, bars = logger.level, datasets.is_progress_bar_enabled()
    logger.setLevel(logging.WARNING)
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        logger.setLevel(level)
        if bars:
            datasets.enable_progress_bars()


def task_metrics(results: Dict[str, Dict[str, Any]]) -> Dict[str, Dict[str, float]]:
    """lm-eval's per-task results as {task: {metric: value}}: "acc,none" -> "acc", a filtered one
    "exact_match,strict-match" -> "exact_match_strict-match"; stderr entries and aliases dropped."""
    out: Dict[str, Dict[str, float]] = {}
    for task, metrics in results.items():
        row = {}
        for key, value in metrics.items():
            metric, _, filt = key.partition(",")
            if metric.endswith("_stderr") or metric == "sample_len" or isinstance(value, bool) \
                    or not isinstance(value, (int, float)):
                continue
            row[metric if filt in ("", "none") else f"{metric}_{filt}"] = float(value)
        if row:
            out[task] = row
    return out


def metric_record(metrics: Dict[str, Dict[str, float]]) -> Dict[str, float]:
    """{"downstream/<task>/<metric>": value}: the keys of metrics.jsonl and W&B."""
    return {f"{PREFIX}/{task}/{metric}": value for task, row in metrics.items() for metric, value in row.items()
            if math.isfinite(value)}


class InLoopTasks:
    """`train.eval_tasks` at every evaluation: resolved once when the run starts (a typo fails before
    training), run on the training model by every rank in lockstep (module docstring)."""

    def __init__(self, names: Sequence[str], limit: int, include_path: str, batch_size: int) -> None:
        self.names, self.limit, self.batch_size = list(names), limit, batch_size
        self.manager = None
        if self.names:
            self.manager, self.names = resolve_tasks(self.names, include_path, "train.eval_tasks")

    def __bool__(self) -> bool:
        return bool(self.names)

    def run(self, model, cfg: ModelConfig, tokenizer, dtype: torch.dtype) -> Dict[str, float]:
        lm = lm_eval_model(model, cfg, tokenizer, self.batch_size, autocast=dtype)
        return metric_record(run_tasks(lm, self.manager, self.names, self.limit or None, seeded=False)["metrics"])
