"""Typed configuration: dataclasses with defaults, loaded from YAML, overridden by ``key.sub=value``.

Validation is strict and happens at load time: unknown keys, wrong types, values outside a field's
``min``/``max`` metadata or a ``Literal``'s choices raise ``ConfigError`` naming the key, the file and
what is allowed. Each component owns its dataclass (``model.config``, ``data_pipeline.config``,
``orchestration.train.config``); this module only composes and checks them.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from data_pipeline.config import DataConfig
from model.config import PRESETS, ModelConfig
from orchestration.finetune.config import FinetuneConfig
from orchestration.sweeps.config import SweepConfig, TuneConfig
from orchestration.train.config import TrainConfig


class ConfigError(ValueError):
    """A configuration problem, with the key, the source and what is allowed."""


@dataclass
class Config:
    """The whole run: one section per component."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)  # `raylm tune` only
    scaling: SweepConfig = field(default_factory=SweepConfig)  # `raylm scaling` only
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)  # `raylm finetune` only


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _describe(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in get_args(tp))
    if origin in (list, tuple):
        (item,) = get_args(tp)[:1] or (Any,)
        return f"a list of {_describe(item)}"
    if origin is dict:
        return "a mapping"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check (and minimally coerce: int->float, numeric strings->float) one value against a type."""

    def fail() -> ConfigError:
        return ConfigError(f"{source}: key '{key}' = {value!r} is not valid; expected {_describe(tp)}")

    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if value in get_args(tp):
            return value
        raise fail()
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise fail()
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, source)
            except ConfigError:
                continue
        raise fail()
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise fail()
        (item,) = get_args(tp)[:1] or (Any,)
        return [_coerce(v, item, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise fail()
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise fail()
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
            return int(value)  # 1e6 in YAML is a float; accept it for integer counts
        if isinstance(value, str):
            try:
                as_float = float(value)
            except ValueError:
                raise fail() from None
            if as_float.is_integer():
                return int(as_float)
        raise fail()
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads "1e-3" as a string (YAML 1.1)
            try:
                return float(value)
            except ValueError:
                raise fail() from None
        raise fail()
    if tp is str:
        if isinstance(value, str):
            return value
        raise fail()
    raise fail()


def _check_range(value: Any, f: dataclasses.Field, key: str, source: str) -> None:
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    lo, hi = f.metadata.get("min"), f.metadata.get("max")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = f"[{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
        raise ConfigError(f"{source}: key '{key}' = {value!r} is out of range; allowed {bounds}")


def build_dataclass(cls: type, values: dict, source: str, prefix: str = "") -> Any:
    """Instantiate ``cls`` from a (nested) mapping, validating every key against its field."""
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: section '{prefix.rstrip('.') or '<top>'}' must be a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    values = dict(values)
    if cls is ModelConfig and values.get("preset") is not None:
        preset = values["preset"]
        if preset not in PRESETS:
            raise ConfigError(
                f"{source}: key '{prefix}preset' = {preset!r} is not valid; allowed: {', '.join(sorted(PRESETS))}"
            )
        values = {**PRESETS[preset], **values}
    kwargs = {}
    for name, value in values.items():
        key = f"{prefix}{name}"
        if name not in known:
            close = difflib.get_close_matches(name, list(known), n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise ConfigError(
                f"{source}: unknown key '{key}'{hint}; allowed keys in "
                f"'{prefix.rstrip('.') or '<top>'}': {', '.join(known)}"
            )
        tp = hints[name]
        if _is_dataclass_type(tp):
            kwargs[name] = build_dataclass(tp, value or {}, source, prefix=f"{key}.")
            continue
        coerced = _coerce(value, tp, key, source)
        _check_range(coerced, known[name], key, source)
        kwargs[name] = coerced
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{source}: section '{prefix.rstrip('.') or '<top>'}': {err}") from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """``train.lr=3e-4`` -> (['train', 'lr'], '3e-4' parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.sub=value")
    key, raw = text.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ConfigError(f"override {text!r} has an empty key")
    return path, yaml.safe_load(raw) if raw.strip() else ""


def _set_path(tree: dict, path: list[str], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override '{'.'.join(path)}': '{part}' is not a section")
        node = child
    node[path[-1]] = value


def load_config(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (), schema: type = Config
) -> Any:
    """Load ``schema`` from a YAML file (or its defaults when ``path`` is None) plus overrides."""
    tree: dict = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        try:
            tree = yaml.safe_load(text) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    for text in overrides:
        key_path, value = parse_override(text)
        _set_path(tree, key_path, value)
    if overrides:
        source += " + overrides " + " ".join(overrides)
    return build_dataclass(schema, tree, source)


def absolute_uri(uri: str) -> str:
    """A local path made absolute against the current directory; URIs (s3://, gs://, ...) unchanged."""
    return uri if "://" in uri else str(Path(uri).expanduser().absolute())


def with_absolute_paths(cfg: Config) -> Config:
    """The same config with its local run/data paths made absolute against the current directory.

    Ray Tune runs each trial in a working directory of its own, where a relative path no longer
    points at what the user meant; URIs (s3://, gs://, ...) are left as they are.
    """
    return dataclasses.replace(
        cfg,
        train=dataclasses.replace(
            cfg.train, data=absolute_uri(cfg.train.data), storage_path=absolute_uri(cfg.train.storage_path)
        ),
        tune=dataclasses.replace(cfg.tune, storage_path=absolute_uri(cfg.tune.storage_path)),
        scaling=dataclasses.replace(cfg.scaling, storage_path=absolute_uri(cfg.scaling.storage_path)),
    )


def config_to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def save_resolved(cfg: Any, path: str | Path) -> Path:
    """Write the fully resolved config (every default filled in) next to a run's outputs."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), encoding="utf-8")
    return path
