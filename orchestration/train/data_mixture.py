"""A pretraining run's data mixture: the weights it trains at and their schedule over steps.

The weights are ``train.mixture_weights`` or, when empty, the ones the data was prepared with. A resume
keeps them (``driver.check_same_run`` compares ``mixture_weights``); a branch may change them, which adds
an entry to the schedule the parent's checkpoint recorded, so the branch reads on from where its parent's
sources stood (``data_pipeline.mixture``). Every checkpoint's meta carries the schedule.
"""

from __future__ import annotations

from typing import Optional

from orchestration.config import ConfigError
from orchestration.train.config import TrainConfig


def run_weights(train: TrainConfig, manifest: dict) -> Optional[dict[str, float]]:
    """The normalized weights this run trains at; None when the data is not a mixture."""
    from data_pipeline.mixture import default_schedule

    if not manifest.get("mixture"):
        if train.mixture_weights:
            raise ConfigError(
                f"train.mixture_weights is set but {manifest['uri']} is not a data mixture; prepare the data "
                "with data.mixture or remove train.mixture_weights"
            )
        return None
    if train.dp.enabled:
        raise ConfigError(
            f"train.dp.enabled samples each step from all train rows alike; {manifest['uri']} is a data mixture "
            "drawn at its weights: train DP-SGD on data prepared with data.sources"
        )
    try:
        return default_schedule(manifest, train.mixture_weights or None)[0][1]
    except ValueError as err:
        raise ConfigError(str(err)) from None


def run_schedule(weights: dict[str, float], manifest: dict, start_meta: Optional[dict]) -> list:
    """[[from_step, weights], ...] for a run starting fresh (``start_meta`` None) or from a checkpoint
    (its own, or a branch point): the checkpoint's schedule on the same data, with these weights from its
    step on when they differ."""
    schedule = [[0, weights]]
    if start_meta is not None and start_meta.get("data") == manifest["uri"] and start_meta.get("mixture_schedule"):
        step = int(start_meta["step"])  # entries after it belong to the parent's later steps, not to this run
        schedule = [[int(s), dict(w)] for s, w in start_meta["mixture_schedule"] if int(s) <= step]
        if schedule[-1][1] != weights:
            schedule = [e for e in schedule if e[0] < step]
            schedule += [] if schedule[-1][1] == weights else [[step, weights]]
    return schedule


def check_schedule(train: TrainConfig, manifest: dict, schedule: list, total_steps: int) -> None:
    """Refuses a run whose sources run out before its last step under mixture_exhausted=stop, and says
    what each source's share is and how many epochs of it the run reads."""
    from data_pipeline.mixture import MixtureExhaustedError, MixtureOrder

    order = MixtureOrder(manifest, train.seed, train.global_batch_size, schedule, train.mixture_exhausted)
    empty = [n for n, o in zip(order.names, order.orders) if o.epoch_rows == 0]
    if empty:
        raise ConfigError(
            f"{manifest['uri']}: mixture sources {empty} have no train rows (all their documents went to val, "
            "or are shorter than a row); add data to them or lower output.val_fraction, and re-run prepare"
        )
    try:
        order.check_fits(total_steps)
    except MixtureExhaustedError as err:
        raise ConfigError(str(err)) from None
    epochs = order.epochs(total_steps - 1)
    steps = ", ".join(
        f"from step {step}: " + ", ".join(f"{n} {w:.3f}" for n, w in weights.items()) for step, weights in schedule
    )
    reads = ", ".join(f"{n} {e:.2f}" for n, e in epochs.items())
    print(
        f"[raylm] data mixture ({steps}); epochs of each source by step {total_steps}: {reads}; a source that "
        f"runs out: {train.mixture_exhausted}",
        flush=True,
    )
