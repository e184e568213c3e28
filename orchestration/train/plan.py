"""The plan a driver hands every worker: what to train, where, from where, for how long.

One typed object for every job the worker loop runs (pretraining, the LSTM baseline, fine-tuning);
the driver fills it after validating everything, so a worker never re-reads the manifest or guesses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from model.config import ModelConfig
from orchestration.artifacts import RunDir
from orchestration.train.config import TrainConfig


@dataclass(frozen=True)
class PrivacyPlan:
    """DP-SGD as the driver resolved it (``orchestration.train.dp.resolve_privacy``): the noise (given, or
    derived from train.dp.target_epsilon), the Poisson sample rate global_batch_size / train_rows, and
    the epsilon the accountant expects at the run's last step."""

    noise_multiplier: float
    sample_rate: float
    delta: float
    max_grad_norm: float
    train_rows: int
    expected_epsilon: float


@dataclass(frozen=True)
class WorkerPlan:
    """Facts the driver resolved, plus the job-specific part ``task`` (read by the task builder).

    ``config`` is the command's resolved config as a dict (written to config.yaml and every
    checkpoint's meta); ``train`` its typed train section, which drives the loop; ``model`` the
    ModelConfig with the tokenizer's vocab size (pretraining) or the checkpoint's shape (fine-tuning);
    ``run`` the run directory (its filesystem resolved once, on the driver); ``checkpoint_files`` the
    small files every checkpoint carries (the tokenizer, fine-tuning's description); ``checkpoint_meta``
    what every checkpoint's meta records so a resume can be checked against it; ``resume_uri`` a
    complete checkpoint the driver picked (a resume of this run, or the branch point of another run).
    """

    config: dict
    train: TrainConfig
    model: ModelConfig
    run: RunDir
    seq_len: int
    total_steps: int
    start_sequence: int  # the first stream position of Ray Data streams (fine-tuning); 0 for the shard reader
    val_batches: int  # val micro-batches per rank; 0: no eval
    checkpoint_files: dict[str, bytes]
    checkpoint_meta: dict
    resume_uri: Optional[str] = None
    task: dict[str, Any] = field(default_factory=dict)
    privacy: Optional[PrivacyPlan] = None  # train.dp.enabled: DP-SGD's resolved parameters
