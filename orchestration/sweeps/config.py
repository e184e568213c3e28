"""The ``tune:``, ``scaling:`` and ``study:`` sections: a hyperparameter search, a scaling-law sweep and
the tokenizer study.

Pure data (no ray import) so configs load and fail fast anywhere. Search-space entries are checked
for shape here; that their keys name real config fields is checked by ``orchestration.sweeps.tune`` against
the whole config before any trial starts. ``SweepConfig`` is named apart from Ray's ScalingConfig.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from data_pipeline.config import SplitByConfig

# kind -> how many arguments it takes (None: a non-empty list of values)
SEARCH_KINDS: dict[str, Optional[int]] = {
    "loguniform": 2,
    "uniform": 2,
    "randint": 2,
    "quniform": 3,
    "choice": None,
    "grid": None,
}


def parse_number(value: Any) -> Any:
    """YAML 1.1 reads ``1e-3`` as a string: a numeric string becomes a float, anything else is unchanged.
    (Here, below ``orchestration.config``, which composes this section and uses it for every section.)"""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def normalize_search_space(space: dict) -> dict:
    """Check every entry is ``{path: {kind: args}}`` with a known kind and valid args; return a copy
    with numeric strings as numbers. Raises ValueError naming the entry."""
    out = {}
    for path, spec in space.items():
        allowed = ", ".join(SEARCH_KINDS)
        if not isinstance(spec, dict) or len(spec) != 1:
            raise ValueError(
                f"search_space.{path} must be a one-key mapping like {{loguniform: [1e-4, 1e-2]}}; "
                f"kinds: {allowed}; got {spec!r}"
            )
        ((kind, args),) = spec.items()
        if kind not in SEARCH_KINDS:
            raise ValueError(f"search_space.{path}: unknown kind {kind!r}; allowed: {allowed}")
        if not isinstance(args, list) or not args:
            raise ValueError(f"search_space.{path}.{kind} needs a non-empty list, got {args!r}")
        arity = SEARCH_KINDS[kind]
        if arity is None:
            out[path] = {kind: list(args)}
            continue
        args = [parse_number(a) for a in args]
        if len(args) != arity or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args):
            raise ValueError(f"search_space.{path}.{kind} needs {arity} numbers, got {args!r}")
        low, high = float(args[0]), float(args[1])
        if not low < high:
            raise ValueError(f"search_space.{path}.{kind}: low ({low}) must be < high ({high})")
        if kind == "loguniform" and low <= 0:
            raise ValueError(f"search_space.{path}.loguniform needs positive bounds, got {args!r}")
        out[path] = {kind: args}
    return out


@dataclass
class TuneConfig:
    """A Ray Tune search over config overrides: metric val_loss (min), ASHA on val loss."""

    name: str = "tune"  # the experiment dir is <storage_path>/<name>; reused -> resumed
    storage_path: str = "runs/tune"
    # override path -> {loguniform|uniform: [lo, hi]} | {randint: [lo, hi)} | {quniform: [lo, hi, q]}
    # | {choice: [values]} | {grid: [values]} (grid: every value, times num_samples)
    search_space: dict[str, Any] = field(default_factory=dict)
    num_samples: int = field(default=4, metadata={"min": 1})
    max_concurrent_trials: Optional[int] = field(default=None, metadata={"min": 1})  # None: as many as fit
    search_alg: Literal["random", "optuna", "hyperopt"] = "random"
    scheduler: Literal["asha", "fifo"] = "asha"
    grace_period: int = field(default=10, metadata={"min": 1})  # ASHA: optimizer steps before a first cut
    reduction_factor: float = field(default=2.0, metadata={"min": 1.01})
    max_t: Optional[int] = field(default=None, metadata={"min": 1})  # ASHA horizon in steps; None: run length
    # null: each worker takes a whole GPU with train.use_gpu; 0: CPU-only trials; a share in (0, 1]:
    # single-worker trials each holding that share of one GPU (0.25: four trials on a GPU)
    gpus_per_trial: Optional[float] = field(default=None, metadata={"min": 0.0, "max": 1.0})
    max_failures: int = field(default=0, metadata={"min": -1})  # trial retries (Tune FailureConfig)
    seed: Optional[int] = None  # search algorithm seed

    def __post_init__(self) -> None:
        self.search_space = normalize_search_space(self.search_space)
        if self.scheduler == "asha" and self.max_t is not None and self.grace_period > self.max_t:
            raise ValueError(f"grace_period ({self.grace_period}) must be <= max_t ({self.max_t})")


@dataclass
class PredictRun:
    """One run beyond a sweep's grid (``scaling.predict``): a ladder size at a token count."""

    n_layer: int = field(default=1, metadata={"min": 1})
    tokens: float = field(default=1e6, metadata={"min": 1.0})


@dataclass
class SweepConfig:
    """A scaling-law sweep: a width/depth ladder of model sizes trained at several token counts.

    Shapes: n_embd = round(aspect * n_layer / head_dim) * head_dim, n_head = n_embd / head_dim, the
    rest of the model section unchanged. LR per size: base_lr * (ref_width / n_embd) ** lr_width_power
    (muP-style: wider models take smaller steps); min_lr keeps the train section's min_lr/lr ratio.
    Global batch per size: train.global_batch_size * (n_embd / ref_width) ** batch_width_power, rounded
    to a multiple of micro_batch_size x num_workers.
    Points: ``tokens`` (every size x every token count), ``budgets`` (IsoFLOP: every size at
    D = C / flops_per_token(N)), ``wsd_tokens_per_param`` (one stable run per size, decay branches at
    D = m * N for each m). ``predict``: runs beyond the grid, each at more compute than every grid run,
    held out of the fits and predicted by the law fitted on the rest (the holdout check: how far the law
    extrapolates). Point results live in <storage_path>/<name>/points/<key>.json and are reused.
    """

    name: str = "scaling"
    storage_path: str = "runs/scaling"
    n_layers: list[int] = field(default_factory=lambda: [2, 3, 4])
    aspect: float = field(default=32.0, metadata={"min": 1.0})
    head_dim: int = field(default=16, metadata={"min": 2})
    tokens: list[float] = field(default_factory=list)
    budgets: list[float] = field(default_factory=list)
    wsd_tokens_per_param: list[float] = field(default_factory=list)
    wsd_decay_fraction: float = field(default=0.2, metadata={"min": 0.01, "max": 0.9})
    base_lr: Optional[float] = field(default=None, metadata={"min": 0.0})  # None: train.lr
    ref_width: int = field(default=64, metadata={"min": 1})
    lr_width_power: float = 1.0
    batch_width_power: float = 0.0
    min_steps: int = field(default=10, metadata={"min": 1})  # fewer optimizer steps: the point is infeasible
    # IsoFLOP: keep only sizes whose D/N lies in this range (null: no bound), so a large budget does not
    # spend most of its FLOPs on tiny models far from its optimum
    min_tokens_per_param: Optional[float] = field(default=None, metadata={"min": 0.0})
    max_tokens_per_param: Optional[float] = field(default=None, metadata={"min": 0.0})
    max_failures: int = field(default=1, metadata={"min": -1})  # retries per point (Tune FailureConfig)
    max_concurrent_trials: Optional[int] = field(default=None, metadata={"min": 1})  # None: as many as fit
    gpus_per_trial: Optional[float] = field(default=None, metadata={"min": 0.0, "max": 1.0})  # as tune.gpus_per_trial
    param_kind: Literal["all", "non_embedding"] = "all"
    holdout: int = field(default=0, metadata={"min": 0})  # largest-compute points held out of the law fit
    predict: list[PredictRun] = field(default_factory=list)  # runs beyond the grid, held out and predicted
    n_boot: int = field(default=100, metadata={"min": 0})

    def __post_init__(self) -> None:
        for name in ("tokens", "budgets", "wsd_tokens_per_param"):
            bad = [v for v in getattr(self, name) if not (math.isfinite(v) and v > 0)]
            if bad:
                raise ValueError(f"{name} must hold positive numbers, got {bad}")
        if self.predict and self.holdout:
            raise ValueError(
                f"holdout={self.holdout} holds out the grid's largest runs, and predict runs are held out "
                "themselves: set holdout: 0 (the predict runs are the holdout check) or remove predict"
            )
        if any(n < 1 for n in self.n_layers) or len(set(self.n_layers)) != len(self.n_layers):
            raise ValueError(f"n_layers must be distinct positive integers, got {self.n_layers}")


STUDY_TOKENIZER_KINDS = ("byte", "bpe", "unigram")  # data_pipeline.codecs.CODEC_KINDS


@dataclass
class TokenizerStudyConfig:
    """``raylm tokenizers``: each tokenizer trained on the same train text, the same GPT (the ``model``
    section, vocab_size from the tokenizer) trained for the same training FLOPs on its tokens, and
    every model scored in bits per byte on the same val text.

    Equal compute: steps = train_flops // (flops_per_token(model at that vocab) x batch_size x
    block_size), so a larger vocabulary (a larger head) buys fewer, longer-reaching tokens.
    """

    # "byte" (256 ids), "bpe:<vocab>", "unigram:<vocab>"
    tokenizers: list[str] = field(default_factory=lambda: ["byte", "bpe:1024", "bpe:4096", "bpe:16384", "unigram:4096"])
    pattern: Literal["gpt2", "gpt4"] = "gpt4"  # the regex pre-split of BPE and Unigram
    # .txt sources, one document per file: "shakespeare" (the embedded corpus; "shakespeare:<glob>" for
    # some of its texts), local paths, directories or globs, or s3:// / gs:// URIs
    corpus: list[str] = field(default_factory=lambda: ["shakespeare"])
    split_by: SplitByConfig = field(default_factory=SplitByConfig)  # what keeps a work on one side
    val_fraction: float = field(default=0.1, metadata={"min": 0.0, "max": 0.5})  # of works
    split_seed: int = 0
    tokenizer_train_bytes: int = field(default=3_000_000, metadata={"min": 1})  # train text each tokenizer sees
    val_bytes: int = field(default=200_000, metadata={"min": 1})  # val text scored: an equal share of each document
    train_flops: float = field(default=1.5e12, metadata={"min": 1.0})  # each model's training budget
    batch_size: int = field(default=16, metadata={"min": 1})  # sequences of model.block_size tokens per step
    lr: float = field(default=3e-3, metadata={"min": 0.0})
    min_lr: float = field(default=3e-4, metadata={"min": 0.0})
    warmup_steps: int = field(default=20, metadata={"min": 0})
    weight_decay: float = field(default=0.1, metadata={"min": 0.0})
    grad_clip: float = field(default=1.0, metadata={"min": 0.0})  # 0: off
    log_interval: int = field(default=10, metadata={"min": 1})  # steps between the train-loss points kept
    # torch CPU threads. 1: these models are too small to split, and on a shared machine a second thread
    # spins against the other load (measured 10x the CPU time per step with 2 threads on a loaded 2-core box)
    threads: int = field(default=1, metadata={"min": 1})
    seed: int = 1337  # model init and the order of training windows, the same for every tokenizer

    def __post_init__(self) -> None:
        if not self.tokenizers:
            raise ValueError("tokenizers is empty; list some, e.g. [byte, bpe:4096, unigram:4096]")
        for entry in self.tokenizers:
            kind, _, size = str(entry).partition(":")
            if kind not in STUDY_TOKENIZER_KINDS or (kind == "byte") != (size == "") or (size and not size.isdigit()):
                raise ValueError(
                    f"tokenizers entry {entry!r} is not 'byte', 'bpe:<vocab>' or 'unigram:<vocab>' (e.g. bpe:4096)"
                )
            if size and int(size) <= 256:
                raise ValueError(f"tokenizers entry {entry!r}: vocab must be > 256 (the bytes plus what it learns)")
        if len(set(self.tokenizers)) != len(self.tokenizers):
            raise ValueError(f"tokenizers lists an entry twice: {self.tokenizers}")
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) must be <= lr ({self.lr})")
