"""What the benchmarks share: a Ray of their own unless one is already running (the smoke test runs them
all on the test session's), and the data of a ``--smoke`` run, made on a clean clone by the real pipeline.

Imported by the benchmark scripts as a sibling module (``python benchmarks/bench_x.py`` puts this folder
on ``sys.path``; tests/test_benchmarks.py does the same).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

from orchestration.runtime import (
    RAY_DATA_LOGGING_CONFIG,
    check_loopback_in_time,
    keep_local_ray_on_loopback,
    starts_local_ray,
)

# On import, before any benchmark imports ray (Ray reads its address setting once, at its own import):
# a Ray started here listens on 127.0.0.1 only; Ray Data's INFO lines go to its log, not the console.
keep_local_ray_on_loopback()
os.environ.setdefault("RAY_DATA_LOGGING_CONFIG", str(RAY_DATA_LOGGING_CONFIG))

# A few short plays of the embedded corpus (~310 kB): enough rows for every smoke run at seq_len 32.
SMOKE_TEXTS = (
    "comedy_of_errors_gut.txt",
    "lovers_complaint_gut.txt",
    "passionate_pilgrim_gut.txt",
    "phoenix_and_the_turtle_gut.txt",
    "rape_of_lucrece_gut.txt",
    "sonnets_gut.txt",
)
SMOKE_VOCAB, SMOKE_SEQ_LEN = 512, 32


@contextlib.contextmanager
def local_ray(**init_kwargs) -> Iterator[None]:
    """Ray for the benchmark: the one already running in this process (the smoke test's), else the
    cluster RAY_ADDRESS names, else a local one on 127.0.0.1 started with ``init_kwargs``. Whatever
    was joined or started here is left (``ray.shutdown``) at the end; a Ray the caller had stays up."""
    import ray

    if ray.is_initialized():
        yield
        return
    if starts_local_ray():  # "local": never the newest cluster `ray start` left here (another user's)
        check_loopback_in_time()
        ray.init(address="local", **init_kwargs)
    else:
        ray.init(log_to_driver=init_kwargs.get("log_to_driver", True))  # its resources are the cluster's
    try:
        yield
    finally:
        ray.shutdown()


def ship_by_value(module_name: str) -> None:
    """Ray workers get the functions of benchmark ``module_name`` by value, as they get a script's
    (``__main__``) own: imported as a module (the smoke test), they could not import it by name."""
    import sys

    from ray import cloudpickle

    if module_name != "__main__":
        cloudpickle.register_pickle_by_value(sys.modules[module_name])


def smoke_manifest(root: Path) -> str:
    """Token shards of ``SMOKE_TEXTS`` written by ``raylm prepare``'s pipeline into ``root/data`` (BPE of
    ``SMOKE_VOCAB`` tokens, rows of ``SMOKE_SEQ_LEN`` + 1; no near-dedup, which six distinct texts do not
    need and which adds group-by passes); returns the manifest URI. Needs Ray running."""
    from data_pipeline.config import DataConfig, NearDedupConfig, OutputConfig, SourceConfig, TokenizerConfig
    from data_pipeline.prepare import prepare
    from data_pipeline.storage import EMBEDDED_CORPUS

    cfg = DataConfig(
        sources=SourceConfig(uris=[f"{EMBEDDED_CORPUS}:{name}" for name in SMOKE_TEXTS]),
        near_dedup=NearDedupConfig(enabled=False),
        tokenizer=TokenizerConfig(vocab_size=SMOKE_VOCAB),
        output=OutputConfig(uri=str(Path(root).resolve() / "data"), seq_len=SMOKE_SEQ_LEN, shard_tokens=40_000),
    )
    return prepare(cfg, verbose=False)
