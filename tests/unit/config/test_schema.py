"""moe/config/schema.py: the dataclass tree, its defaults and the sizes derived from it; and the
package's re-exports (`from moe.config import ...` keeps working for every public name)."""
import ast
import dataclasses
import inspect

import pytest

import moe.config
from moe.config import (Config, ModelConfig, MoEConfig, TrainConfig, dense_ffn_hidden, expert_hidden,
                        global_batch_size, grad_accum_steps, load_config, moe_layer_ids)
from moe.config import checks, load, schema


def test_defaults_are_a_small_dense_model_and_load_as_such():
    cfg = Config()
    assert cfg.model.moe.num_experts == 0 and moe_layer_ids(cfg.model) == []
    assert (cfg.model.d_model, cfg.model.n_layers, cfg.model.n_heads) == (128, 4, 4)
    assert (cfg.data.dataset, cfg.data.tokenizer) == ("embedded:stdlib", "bytes")
    assert (cfg.run.name, cfg.run.root) == ("run", "runs")
    assert load_config() == cfg  # no file, no overrides: the dataclass defaults


def test_every_section_is_its_own_instance():
    a, b = Config(), Config()
    a.logging.wandb.tags.append("x")
    a.model.moe.top_k = 1
    assert b.logging.wandb.tags == [] and b.model.moe.top_k == 2


@pytest.mark.parametrize("d_model,ffn_hidden,want", [(128, 0, 352), (64, 0, 176), (96, 0, 256), (128, 100, 100)])
def test_dense_ffn_hidden_is_8_thirds_of_d_model_rounded_up_to_16(d_model, ffn_hidden, want):
    assert dense_ffn_hidden(ModelConfig(d_model=d_model, ffn_hidden=ffn_hidden)) == want


def test_expert_hidden_defaults_to_the_dense_ffn():
    m = ModelConfig(d_model=128, moe=MoEConfig(num_experts=4))
    assert expert_hidden(m) == dense_ffn_hidden(m) == 352
    assert expert_hidden(dataclasses.replace(m, moe=MoEConfig(num_experts=4, expert_hidden=64))) == 64


@pytest.mark.parametrize("n_layers,moe_kw,want", [
    (4, {"num_experts": 0, "moe_every": 1}, []),
    (4, {"num_experts": 4, "moe_every": 1}, [0, 1, 2, 3]),
    (4, {"num_experts": 4, "moe_every": 2}, [1, 3]),
    (6, {"num_experts": 4, "moe_every": 3}, [2, 5]),
    (4, {"num_experts": 4, "moe_every": 2, "moe_layers": [3, 0, 3]}, [0, 3]),
    (4, {"num_experts": 0, "moe_layers": [1]}, []),
])
def test_moe_layer_ids(n_layers, moe_kw, want):
    assert moe_layer_ids(ModelConfig(n_layers=n_layers, moe=MoEConfig(**moe_kw))) == want


@pytest.mark.parametrize("gbs,mbs,world,want_gbs,want_accum", [(0, 8, 1, 8, 1), (0, 8, 2, 16, 1), (64, 8, 2, 64, 4),
                                                                (12, 2, 3, 12, 2)])
def test_global_batch_and_accumulation(gbs, mbs, world, want_gbs, want_accum):
    cfg = Config(train=TrainConfig(global_batch_size=gbs, micro_batch_size=mbs))
    assert global_batch_size(cfg, world) == want_gbs
    assert grad_accum_steps(cfg, world) == want_accum


def _defined_names(module):
    """The names a module itself defines at top level (classes, functions, assignments)."""
    tree = ast.parse(inspect.getsource(module))
    for node in tree.body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef)):
            yield node.name
        elif isinstance(node, ast.Assign):
            yield from (t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            yield node.target.id


def test_the_package_re_exports_every_public_name_of_its_modules():
    for module in (schema, load, checks):
        for name in _defined_names(module):
            if name.startswith("_") or name == "Layer":
                continue
            if module is checks and name.startswith("check_") and name != "check_fields":
                continue  # the stages of check_fields: moe.validate imports them from moe.config.checks
            assert getattr(moe.config, name, None) is getattr(module, name), \
                f"moe.config does not re-export {module.__name__}.{name}"
    assert set(moe.config.__all__) <= set(dir(moe.config))
    assert not hasattr(moe.config, "validate")  # moved: moe.validate.validate
