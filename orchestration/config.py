"""Typed configuration: one schema per command, sections loaded from YAML, overridden by ``key.sub=value``.

Each component owns its section's dataclass (``model.config``, ``data_pipeline.config``,
``orchestration.train.config``, ``orchestration.finetune.config``, ``orchestration.sweeps.config``);
this module composes them into the schema of each command and checks them. Validation is strict and
happens at load time: unknown sections or keys, wrong types, values outside a field's ``min``/``max``
metadata or a ``Literal``'s choices raise ``ConfigError`` naming the key, the file and what is allowed;
a section the command does not use is an error naming the command.
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
from model.config import ModelConfig
from orchestration.finetune.config import FinetuneConfig
from orchestration.sweeps.config import SweepConfig, TokenizerStudyConfig, TuneConfig, parse_number
from orchestration.train.config import TrainConfig


class ConfigError(ValueError):
    """A configuration problem, with the key, the source and what is allowed."""


@dataclass
class PretrainConfig:
    """``raylm prepare``, ``train`` and ``demo``: the data to prepare, the model and how to train it."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass
class TuneRunConfig(PretrainConfig):
    """``raylm tune``: a pretraining config plus the search."""

    tune: TuneConfig = field(default_factory=TuneConfig)


@dataclass
class ScalingRunConfig(PretrainConfig):
    """``raylm scaling``: a pretraining config plus the sweep."""

    scaling: SweepConfig = field(default_factory=SweepConfig)


@dataclass
class TokenizerStudyRunConfig:
    """``raylm tokenizers``: the model every tokenizer trains (vocab_size comes from each) and the study."""

    model: ModelConfig = field(default_factory=ModelConfig)
    study: TokenizerStudyConfig = field(default_factory=TokenizerStudyConfig)


@dataclass
class FinetuneModelConfig:
    """The model shape comes from the checkpoint (task distill: finetune.student or a student
    checkpoint); only dropout may change for fine-tuning."""

    dropout: float = field(default=0.0, metadata={"min": 0.0, "max": 0.99})


@dataclass
class FinetuneRunConfig:
    """``raylm finetune``: which checkpoint and task, and the ordinary training knobs; ``data`` is the
    domain corpus ``raylm prepare`` builds from the same file for task lm."""

    model: FinetuneModelConfig = field(default_factory=FinetuneModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)


# Keys of a section that a command's schema shares but does not read: naming them is an error.
EXCLUDED_KEYS: dict[type, dict[str, str]] = {
    FinetuneRunConfig: {
        "train.data": "fine-tuning reads finetune.data; train.data is for pretraining, remove it",
        "train.val_sequences": "fine-tuning scores finetune.max_val_examples val rows at every evaluation; "
        "set that instead of train.val_sequences",
    }
}
COMMAND_OF: dict[type, str] = {
    PretrainConfig: "raylm train / prepare / demo",
    TuneRunConfig: "raylm tune",
    ScalingRunConfig: "raylm scaling",
    FinetuneRunConfig: "raylm finetune",
    TokenizerStudyRunConfig: "raylm tokenizers",
}
Config = PretrainConfig  # the schema most code (training, sweeps' trials) works with
ALL_SECTIONS = ("model", "data", "train", "tune", "scaling", "finetune", "study")


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
    if _is_dataclass_type(tp):  # an item of a list of sections, e.g. data.mixture[1]
        return build_dataclass(tp, value, source, prefix=f"{key}.")
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
        as_float = parse_number(value)
        if isinstance(value, str) and isinstance(as_float, float) and as_float.is_integer():
            return int(as_float)
        raise fail()
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(parse_number(value), float):
            return parse_number(value)
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


def build_dataclass(cls: type, values: dict, source: str, prefix: str = "", root: type | None = None) -> Any:
    """Instantiate ``cls`` from a (nested) mapping, validating every key against its field.

    ``root`` is the command schema a nested section belongs to (for its excluded keys)."""
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: section '{prefix.rstrip('.') or '<top>'}' must be a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    values = dict(values)
    if hasattr(cls, "expand_preset"):  # ModelConfig: a named preset fills the keys not given explicitly
        try:
            values = cls.expand_preset(values)
        except ValueError as err:
            raise ConfigError(f"{source}: key '{prefix}preset': {err}") from None
    kwargs = {}
    for name, value in values.items():
        key = f"{prefix}{name}"
        if not prefix and name not in known and cls in COMMAND_OF and name in ALL_SECTIONS:
            raise ConfigError(
                f"{source}: section '{name}' is not used by `{COMMAND_OF[cls]}` (it takes "
                f"{', '.join(known)}); remove it or run the command that reads it"
            )
        if f"{prefix}{name}" in EXCLUDED_KEYS.get(root or cls, {}):
            raise ConfigError(f"{source}: key '{prefix}{name}': {EXCLUDED_KEYS[root or cls][prefix + name]}")
        if name not in known:
            close = difflib.get_close_matches(name, list(known), n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise ConfigError(
                f"{source}: unknown key '{key}'{hint}; allowed keys in "
                f"'{prefix.rstrip('.') or '<top>'}': {', '.join(known)}"
            )
        tp = hints[name]
        if _is_dataclass_type(tp):
            kwargs[name] = build_dataclass(tp, value or {}, source, prefix=f"{key}.", root=root or cls)
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


def schema_of(path: str | Path | None) -> type:
    """The command schema a config file is written for, by its sections: ``raylm prepare`` reads the
    ``data`` section of any of them."""
    if path is None:
        return PretrainConfig
    try:
        tree = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return PretrainConfig  # load_config reports what is wrong with the file
    for section, schema in (
        ("finetune", FinetuneRunConfig),
        ("tune", TuneRunConfig),
        ("scaling", ScalingRunConfig),
        ("study", TokenizerStudyRunConfig),
    ):
        if isinstance(tree, dict) and section in tree:
            return schema
    return PretrainConfig


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
        except IsADirectoryError:
            found = sorted(p.name for p in Path(path).glob("*.yaml"))
            hint = f" (it holds {', '.join(found)})" if found else " (see configs/)"
            raise ConfigError(f"config {path} is a directory; pass a YAML file{hint}") from None
        except OSError as err:
            raise ConfigError(f"config file {path} cannot be read: {err.strerror or err}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{path} is not a UTF-8 text file; pass a YAML config (see configs/)") from None
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


def check_finetune_data(ft: FinetuneConfig) -> None:
    """A labelled task's ``finetune.data`` must be a shipped task of that kind or a JSONL URI with
    ``{split}``; checked without reading anything, so `raylm finetune` refuses it before a checkpoint
    is fetched or Ray starts."""
    if ft.data is None or ft.task in ("lm", "distill"):
        return  # a missing value is the driver's check (run_finetune); a manifest is read when the run starts
    from data_pipeline.task_data import check_source

    try:
        check_source(ft.data, ft.task)
    except ValueError as err:
        raise ConfigError(f"key 'finetune.data' (finetune.task={ft.task}): {err}") from None


def with_absolute_paths(cfg: Any) -> Any:
    """The same config with its local run/data paths made absolute against the current directory.

    Ray Train workers and Tune trials run in working directories of their own, where a relative path
    no longer points at what the user meant; URIs (s3://, gs://, ...) are left as they are.
    """
    from orchestration.artifacts import absolute_uri

    changes: dict = {}
    train = cfg.train
    changes["train"] = dataclasses.replace(
        train,
        storage_path=absolute_uri(train.storage_path),
        **({"data": absolute_uri(train.data)} if isinstance(cfg, PretrainConfig) else {}),
    )
    for name in ("tune", "scaling"):
        if hasattr(cfg, name):
            section = getattr(cfg, name)
            changes[name] = dataclasses.replace(section, storage_path=absolute_uri(section.storage_path))
    return dataclasses.replace(cfg, **changes)


def config_to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)
