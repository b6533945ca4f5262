"""Loading and writing configs: YAML files (with `defaults:` layering) and dotted `key=value`
overrides merged over the dataclass defaults by OmegaConf (unknown keys and wrong types refused,
naming the file or override), and the dumps that get written (`to_yaml`, `to_dict`), in which a
secret's value never appears.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import math
import os
import re
import typing
from typing import Any, List, Optional, Tuple

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from moe.config.schema import Config
from moe.errors import ConfigError
from moe.io import REDACTED, SECRET_NAME, redact, secret_values

YAML_SUFFIXES = (".yaml", ".yml")

# One layer of the merge and what an error in it is blamed on: a file path or `override 'k=v'`.
Layer = Tuple[str, dict]


def _error_key(exc: OmegaConfBaseException) -> str:
    """OmegaConf's message, one line, with the key it is about in front."""
    key = getattr(exc, "full_key", None) or ""
    msg = (getattr(exc, "msg", None) or str(exc) or type(exc).__name__).splitlines()[0]
    return f"{key}: {msg}" if key else msg


def _config_error(message: str) -> ConfigError:
    # an error may quote a value resolved from `${oc.env:...}`: never print a secret's value
    return ConfigError(redact(message))


def load_config(path: Optional[str] = None, overrides: Optional[List[str]] = None) -> Config:
    """defaults < YAML at `path` (may list `defaults: [other.yaml]` to layer files) < overrides.

    An int field also takes an integral float (`data.max_bytes=1e6`, `steps: 2.0e3`): OmegaConf alone
    refuses them, and a size written in e-notation is what people type. A fractional or non-finite
    float there is refused naming the key. Every error is a one-line ConfigError naming the key, the
    file or the override; nothing is written."""
    layers: List[Layer] = []
    if path is not None:
        layers.extend(_yaml_layers(path, seen=()))
    layers.extend(_override_layer(ov) for ov in overrides or [])
    merged = _merge(layers)
    try:  # resolves interpolations (`${oc.env:...}`): errors name the key, not the layer
        cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as exc:
        raise _config_error(_error_key(exc)) from None
    if path is not None and not any(_sets_run_name(layer) for _, layer in layers):
        cfg.run.name = os.path.splitext(os.path.basename(path))[0]
    return cfg


@functools.cache
def _schema() -> Any:
    """The defaults as an OmegaConf tree, built once (building it is most of a load's time); merging
    copies it, so it is never changed."""
    return OmegaConf.structured(Config)


def _merge(layers: List[Layer]) -> Any:
    """The layers over the schema in one merge (the fast path); after an error, again one at a time,
    so that the error names the file or override with the unknown key or the wrong type."""
    try:
        return OmegaConf.merge(_schema(), *(layer for _, layer in layers))
    except OmegaConfBaseException as exc:
        error = _error_key(exc)
    merged = copy.deepcopy(_schema())
    for source, layer in layers:
        try:
            merged.merge_with(layer)
        except OmegaConfBaseException as exc:
            raise _config_error(f"{source}: {_error_key(exc)}") from None
    raise _config_error(error)


def _sets_run_name(layer: dict) -> bool:
    run = layer.get("run")
    return isinstance(run, dict) and run.get("name") is not None


def _override_layer(ov: str) -> Layer:
    source = f"override {ov!r}"
    if "=" not in ov:
        raise _config_error(f"{source}: expected key=value (for example model.n_layers=4)")
    key = ov.split("=", 1)[0]
    if key.startswith(("+", "~")):
        raise _config_error(f"{source}: adding or removing keys is not allowed")
    try:  # resolve=False: interpolations stay text until the whole config resolves them
        layer = OmegaConf.to_container(OmegaConf.from_dotlist([ov]), resolve=False)
    except OmegaConfBaseException as exc:
        raise _config_error(f"{source}: {_error_key(exc)}") from None
    except yaml.YAMLError as exc:  # OmegaConf parses the value as YAML: `key=a: b` or an unclosed quote
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise _config_error(f"{source}: the value is not a YAML scalar ({problem}); quote it") from None
    return source, _integral_floats_to_int(layer, Config, "", source)


def _yaml_layers(path: str, seen: tuple) -> List[Layer]:
    """The layers of one YAML file: its `defaults` (each a YAML file relative to it), then itself."""
    if not path.lower().endswith(YAML_SUFFIXES):
        # checked before opening it: `defaults: [/etc/passwd]` must not get as far as a parse error
        raise _config_error(f"{path}: not a YAML config file (the name must end in .yaml or .yml)")
    if not os.path.isfile(path):
        raise _config_error(f"config file not found: {path}")
    real = os.path.realpath(path)
    if real in seen:
        raise _config_error(f"{path}: `defaults` includes itself")
    raw = _read_yaml_mapping(path)
    layers: List[Layer] = []
    if "defaults" in raw:
        parents = raw.pop("defaults")
        if isinstance(parents, str):
            parents = [parents]
        if not isinstance(parents, list) or not all(isinstance(p, str) and p for p in parents):
            raise _config_error(f"{path}: `defaults` must be a list of YAML file names (relative to this file)")
        for parent in parents:
            layers.extend(_yaml_layers(os.path.join(os.path.dirname(path), parent), seen + (real,)))
    layers.append((path, _integral_floats_to_int(raw, Config, "", path)))
    return layers


def _read_yaml_mapping(path: str) -> dict:
    """The file's top-level mapping as plain data (interpolations kept as text). Errors name the
    file and the line and column, never the text: the file may not be a config at all."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError:
        raise _config_error(f"{path}: not a YAML config file (not UTF-8 text)") from None
    except OSError as exc:
        raise _config_error(f"{path}: cannot read it: {exc.strerror}") from None
    try:
        # composing gives the document's shape without building it: empty, a mapping or not
        node = yaml.compose(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        if node is None or node.tag.endswith(":null"):  # nothing but comments: it would train the defaults
            raise _config_error(f"{path}: the file is empty (or only comments); a config sets at least one key")
        if not isinstance(node, yaml.MappingNode):
            raise _config_error(f"{path}: top level must be a mapping of config keys (key: value lines)")
        layer = OmegaConf.create(text)  # OmegaConf's loader: 1e3 is a float, duplicate keys are errors
    except yaml.YAMLError as exc:
        raise _config_error(f"{path}: invalid YAML{_yaml_position(exc)}") from None
    except OmegaConfBaseException as exc:
        raise _config_error(f"{path}: {_error_key(exc)}") from None
    return OmegaConf.to_container(layer, resolve=False)  # type: ignore[return-value]


def _yaml_position(exc: yaml.YAMLError) -> str:
    """` at line L, column C` of a YAML error (PyYAML's message would quote the text)."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    return f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""


def _integral_floats_to_int(layer: dict, cls: type, prefix: str, source: str) -> dict:
    """Turn the integral floats of `layer`'s int fields (schema: dataclass `cls`) into ints, in place."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name not in layer:
            continue
        key, value, hint = prefix + f.name, layer[f.name], hints[f.name]
        if dataclasses.is_dataclass(hint) and isinstance(value, dict):
            _integral_floats_to_int(value, hint, key + ".", source)
        elif hint is int:
            layer[f.name] = _as_int(value, key, source)
        elif hint == Optional[List[int]] and isinstance(value, list):
            layer[f.name] = [_as_int(v, f"{key}[{i}]", source) for i, v in enumerate(value)]
    return layer


def _as_int(value: Any, key: str, source: str) -> Any:
    if not isinstance(value, float):
        return value  # ints pass; anything else is OmegaConf's to refuse (it names the key)
    if not (math.isfinite(value) and value.is_integer()):
        raise _config_error(f"{source}: {key} wants an integer, got {value}")
    return int(value)


def to_dict(cfg: Config) -> dict:
    """The config as plain data for what is written or logged (W&B's config, comparing a run folder's
    config): values of secret-named environment variables (`${oc.env:HF_TOKEN}`) read <redacted>.
    The Config itself keeps them."""
    return _replace_secrets(dataclasses.asdict(cfg), lambda name: REDACTED)


def to_yaml(cfg: Config) -> str:
    """The config as YAML for the run folder's and checkpoints' config.yaml. A secret's value is written
    as `${oc.env:NAME,'<redacted>'}`: no file holds it, and a job that trains from the file (`moe
    launch`) or a resumed run gets it back from its own environment (or `<redacted>` without it)."""
    data = _replace_secrets(dataclasses.asdict(cfg), lambda name: f"${{oc.env:{name},'{REDACTED}'}}")
    return OmegaConf.to_yaml(OmegaConf.create(data))


def _replace_secrets(data: Any, replacement) -> Any:
    """`data` with each secret value inside its strings replaced by `replacement(env var name)`."""
    secrets = secret_values()  # longest first, so that a secret containing another is replaced whole
    if not secrets:
        return data
    # one pass, so that no secret is looked for inside a replacement; several names for one value: the first
    pattern = re.compile("|".join(re.escape(v) for v in secrets))
    names = {v: k for k, v in sorted(os.environ.items(), reverse=True) if v in secrets and SECRET_NAME.search(k)}

    def walk(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: walk(v) for k, v in x.items()}
        if isinstance(x, list):
            return [walk(v) for v in x]
        if isinstance(x, str):
            return pattern.sub(lambda m: replacement(names[m.group()]), x)
        return x

    return walk(data)


def config_from_yaml_text(text: str) -> Config:
    """A config as stored in a run folder or checkpoint (written by to_yaml)."""
    try:
        merged = OmegaConf.merge(_schema(), OmegaConf.create(text))
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except OmegaConfBaseException as exc:
        raise _config_error(_error_key(exc)) from None
    except yaml.YAMLError as exc:  # a damaged file: where, not what
        raise _config_error(f"invalid YAML{_yaml_position(exc)}") from None
