"""moe/train/build.py: `build_training` makes everything a run needs before its first step -- threads,
the host-memory policy, a process group of one, seeds, data (resolving model.vocab_size from the
tokenizer, refusing a smaller one), the model and its DeepSpeed engine -- checked on what one child
process built (DeepSpeed keeps process-global state); `seed_everything` in this process."""
import json
import os
import random

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from moe.nn.gpt import GPT
from moe.train.build import TrainingSetup, seed_everything
from tests.helpers import run_engine_script

# one worker runs this module, so its engine subprocess (module fixture) runs once
pytestmark = pytest.mark.xdist_group("engine_build")

BODY = """
import dataclasses
import torch.distributed as dist
from moe.errors import ConfigError
from moe.nn.moe_layer import MoELayer


cfg = config("train.threads=2", "train.global_batch_size=8", "model.moe.bias_update_rate=0.01")
vocab_before = cfg.model.vocab_size
s = build_training(cfg, 1)
save_tensors("initial", s.model.state_dict())
dump("moe", {
    "fields": [f.name for f in dataclasses.fields(s)],
    "threads": torch.get_num_threads(),
    "vocab_before": vocab_before, "vocab_after": cfg.model.vocab_size, "tokenizer_vocab": s.data.tokenizer.vocab_size,
    "embed_rows": s.model.embed.weight.shape[0],
    "dist": [s.dist_info.rank, s.dist_info.world_size, s.dist_info.local_rank, str(s.dist_info.device),
             s.dist_info.backend, dist.is_initialized(), dist.get_world_size(), dist.get_backend()],
    "accum": s.accum, "engine_accum": s.engine.gradient_accumulation_steps(),
    "engine_micro": s.engine.train_micro_batch_size_per_gpu(), "dtype": str(s.dtype),
    "engine_wraps_model": s.engine.module is s.model, "zero": s.engine.zero_optimization_stage(),
    "optimizer": type(s.optimizer).__name__, "scheduler": type(s.scheduler).__name__,
    "engine_scheduler_is_scheduler": s.engine.lr_scheduler is s.scheduler,
    "lr": [g["lr"] for g in s.optimizer.param_groups], "betas": s.optimizer.param_groups[0]["betas"],
    "moe_layers": {str(k): [type(v).__name__, v is s.model.blocks[k].ffn] for k, v in s.moe_layers.items()},
    "moe_layer_count": sum(isinstance(m, MoELayer) for m in s.model.modules()),
    "freed_memory_kept": s.freed_memory_kept,
    "data": [s.data.train.num_tokens, s.data.val.num_tokens, s.data.cache_path],
    "seed": cfg.run.seed,
})
dense_cfg = config("model.vocab_size=300", "train.dtype=fp32", "train.keep_freed_memory=false", yaml="debug_dense.yaml")
d = build_training(dense_cfg, 1)
dump("dense", {"moe_layers": len(d.moe_layers), "vocab": dense_cfg.model.vocab_size,
               "embed_rows": d.model.embed.weight.shape[0], "freed_memory_kept": d.freed_memory_kept,
               "accum": d.accum, "dtype": str(d.dtype)})
try:
    build_training(config("model.vocab_size=100"), 1)
    dump("small_vocab", None)
except ConfigError as exc:
    dump("small_vocab", str(exc))
"""


@pytest.fixture(scope="module")
def built(tmp_path_factory, text_corpus, data_cache):
    out = run_engine_script(tmp_path_factory.mktemp("build"), BODY, text_corpus, data_cache)
    return {name[:-5]: json.load(open(os.path.join(out, name))) for name in os.listdir(out) if name.endswith(".json")} | \
        {"dir": out}


def test_the_setup_holds_every_piece(built):
    b = built["moe"]
    assert b["fields"] == ["dist_info", "data", "model", "engine", "optimizer", "scheduler", "dtype", "accum",
                           "moe_layers", "freed_memory_kept"]
    assert b["fields"] == [f for f in TrainingSetup.__dataclass_fields__]
    assert b["engine_wraps_model"] and b["engine_scheduler_is_scheduler"]
    assert b["optimizer"] == "AdamW" and b["scheduler"] == "LambdaLR" and b["zero"] == 0
    assert b["betas"] == [0.9, 0.95]
    assert b["lr"] and all(lr == pytest.approx(3e-3 / 5) for lr in b["lr"])  # warmup step 1 of 5 (debug config)


def test_one_process_is_a_gloo_world_of_one_on_the_cpu(built):
    assert built["moe"]["dist"] == [0, 1, 0, "cpu", "gloo", True, 1, "gloo"]
    assert built["moe"]["dtype"] == "torch.float32"  # auto on CPU


def test_threads_accumulation_and_host_memory_come_from_the_config(built):
    b = built["moe"]
    assert b["threads"] == 2  # train.threads (the child started with OMP_NUM_THREADS=1)
    assert b["accum"] == b["engine_accum"] == 2  # global batch 8 = micro batch 4 x 2
    assert b["engine_micro"] == 4
    assert b["freed_memory_kept"] is True and built["dense"]["freed_memory_kept"] is False
    assert built["dense"]["accum"] == 1


def test_the_vocabulary_is_resolved_from_the_tokenizer_or_kept_when_larger(built):
    b = built["moe"]
    assert b["vocab_before"] == 0 and b["vocab_after"] == b["tokenizer_vocab"] == b["embed_rows"] == 257  # bytes + EOS
    assert built["dense"]["vocab"] == built["dense"]["embed_rows"] == 300
    assert built["small_vocab"] == "model.vocab_size (100) is smaller than the tokenizer's vocabulary (257)"


def test_moe_layers_are_the_blocks_moe_ffns_by_block_index(built):
    assert built["moe"]["moe_layers"] == {"0": ["MoELayer", True], "1": ["MoELayer", True]}
    assert built["moe"]["moe_layer_count"] == 2
    assert built["dense"]["moe_layers"] == 0


def test_the_data_is_tokenized_into_the_cache(built, data_cache):
    train_tokens, val_tokens, cache_path = built["moe"]["data"]
    assert train_tokens > 10 * val_tokens > 0
    assert os.path.realpath(cache_path).startswith(os.path.realpath(data_cache))


def test_the_model_is_initialised_from_run_seed(built):
    """The engine's model at build time is the layout-free init of run.seed (moe/nn/init.py): GPT built on
    meta, materialised and initialised from (run.seed, name) keyed generators, whatever the global RNG."""
    from moe.config import load_config
    from moe.nn.init import init_weights, materialize
    from tests.helpers import ROOT

    initial = load_file(os.path.join(built["dir"], "initial.safetensors"))
    cfg = load_config(os.path.join(ROOT, "experiments", "debug_moe.yaml"),
                      ["model.d_model=32", "model.ffn_hidden=64", "model.moe.expert_hidden=32", "train.seq_len=32",
                       "model.moe.bias_update_rate=0.01", "model.vocab_size=257"])

    def init(seed):
        torch.manual_seed(seed + 12345)  # the global RNG plays no part
        with torch.device("meta"):
            model = GPT(cfg.model)
        materialize(model, torch.device("cpu"))
        init_weights(model, seed)
        return model.state_dict()

    mine = init(built["moe"]["seed"])
    assert set(initial) == set(mine)
    for name, t in mine.items():
        assert torch.equal(initial[name], t.float()), name
    assert not torch.equal(init(built["moe"]["seed"] + 1)["embed.weight"], initial["embed.weight"])


def test_seed_everything_seeds_python_numpy_and_torch():
    seed_everything(7)
    first = (random.random(), float(np.random.rand()), float(torch.rand(())))
    random.random(), np.random.rand(), torch.rand(())
    seed_everything(7)
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == first
    seed_everything(8)
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) != first
