"""One typed config tree for every run.

Each component owns a small dataclass whose fields are documented where they are declared
(moe/config/schema.py). A run's config is merged as: dataclass defaults < YAML file(s) < dotted
command-line overrides (`model.n_layers=4`), by moe/config/load.py; unknown keys and wrong types are
rejected by OmegaConf's structured merge, and the dumps that get written (`to_yaml`, `to_dict`) never
hold a secret's value. moe/config/checks.py checks the tree's own fields (`RANGES`: finite, sizes
capped; then the cross-field constraints). Every error is a one-line `ConfigError` naming the
offending key (or file).

The config is the bottom layer (it imports only moe.io and moe.errors), so the one validation every
caller runs, which adds each component's checks of its own knobs, is `moe.validate.validate`.
"""
from moe.config.checks import (MAX_NAME_BYTES, MAX_PARAMS, MAX_ROPE_ENTRIES, QK_NORMS, RANGES, Range, check_fields,
                               folder_name_error, folder_name_problem)
from moe.config.load import YAML_SUFFIXES, config_from_yaml_text, load_config, to_dict, to_yaml
from moe.config.schema import (CheckpointConfig, Config, DataConfig, DataSourceConfig, LoggingConfig, ModelConfig, MoEConfig,
                               ParallelConfig, RunConfig, TrainConfig, WandbConfig, attention_heads, dense_ffn_hidden,
                               expert_hidden, global_batch_size, grad_accum_steps, moe_layer_ids)
from moe.errors import ConfigError  # re-exported: `from moe.config import ConfigError`

__all__ = [
    "MAX_NAME_BYTES", "MAX_PARAMS", "MAX_ROPE_ENTRIES", "QK_NORMS", "RANGES", "YAML_SUFFIXES", "CheckpointConfig", "Config",
    "ConfigError", "DataConfig", "DataSourceConfig", "LoggingConfig", "ModelConfig", "MoEConfig", "ParallelConfig", "Range", "RunConfig",
    "TrainConfig", "WandbConfig", "attention_heads", "check_fields", "config_from_yaml_text", "dense_ffn_hidden", "expert_hidden",
    "folder_name_error", "folder_name_problem", "global_batch_size", "grad_accum_steps", "load_config",
    "moe_layer_ids", "to_dict", "to_yaml",
]
