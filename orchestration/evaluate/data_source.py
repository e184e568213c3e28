"""Which held-out text an eval scores, and the error for input an eval cannot use.

``training_manifest``: with no ``--data``, the token manifest a checkpoint was trained on, found from
its ``raylm_meta.json`` (the file that travels with every checkpoint, locally or on object storage):

    pretraining checkpoint           "data": the manifest it trained on
    fine-tune, task lm               "data": the manifest it trained on
    fine-tune, task sft/classif.     "data": a shipped task or a JSONL of prompts/labels, no token rows;
                                     "base_checkpoint" leads to the checkpoint it started from
    `raylm export --format raylm`    "data" (and "base_checkpoint") copied from the checkpoint it was
                                     exported from; an export without them (older raylm): "checkpoint"
                                     leads to that checkpoint

``manifest_rows``: a manifest split's first rows, the ones training's validation scores (lm, mc,
continuation suites and the baselines read them). ``check_tokenizer``: held-out token rows must come
from the checkpoint's own tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import tiktoken

from orchestration.artifacts import RunDir
from orchestration.checkpoint_format import CHECKPOINT_META_FILE, complete_checkpoint_meta

PASS_DATA = "pass --data (a manifest.json from `raylm prepare`, or a UTF-8 text file)"
MAX_LINEAGE = 8  # checkpoints followed at most (an export of a fine-tune of a fine-tune of ...)


class EvalError(ValueError):
    """Data, options or templates an eval cannot use, saying which and what to do."""


@dataclass(frozen=True)
class TrainingManifest:
    """A checkpoint's own held-out data: the manifest URI and how it was found (printed with the scores)."""

    uri: str
    origin: str


def is_task_rows(data: str) -> bool:
    """Whether a fine-tune's ``finetune.data`` names labelled rows (a shipped task, or a JSONL with a
    ``{split}`` placeholder, as ``data_pipeline.task_data.load_examples`` reads them), not a manifest."""
    from data_pipeline.task_data import SHIPPED_TASKS

    return data in SHIPPED_TASKS or "{split}" in data


def training_manifest(meta: dict, endpoint_url: Optional[str] = None) -> TrainingManifest:
    """The token manifest that the checkpoint with ``meta`` (``load_checkpoint_model``'s, with its
    "checkpoint_uri") was trained on; a fine-tune on task rows or an export leads to the checkpoint it
    came from (table above). The manifest is read, so one moved or deleted since is an ``EvalError``
    naming it and ``--data`` before anything is scored."""
    from data_pipeline.manifest import MANIFEST, load_manifest
    from data_pipeline.storage import DataSourceError, join

    start = where = meta["checkpoint_uri"]
    path: list[str] = []
    for _ in range(MAX_LINEAGE):
        data = meta.get("data")
        if data is not None and not is_task_rows(data):
            break
        came_from = meta.get("base_checkpoint") if data is not None else meta.get("checkpoint")
        if came_from is None:
            raise EvalError(f"{where}: its {CHECKPOINT_META_FILE} names no training data; {PASS_DATA}")
        if data is None:
            hop = f"exported from {came_from}"
        else:
            hop = f"fine-tuned from {came_from} on task rows ({data})"
            if meta.get("checkpoint") is not None:  # an export carrying its source's data
                hop = f"exported from {meta['checkpoint']}, {hop}"
        path.append(f"{where} was {hop}")
        try:
            meta = complete_checkpoint_meta(RunDir.at(came_from, endpoint_url))
        except OSError as err:
            raise EvalError(f"{'; '.join(path)}, which cannot be read ({err}); {PASS_DATA}") from err
        if meta is None:
            raise EvalError(
                f"{'; '.join(path)}, but {came_from} is gone (no complete checkpoint there), so the "
                f"manifest to score is unknown; {PASS_DATA}"
            )
        where = came_from
    else:
        raise EvalError(f"{start}: more than {MAX_LINEAGE} checkpoints back to its data; {PASS_DATA}")
    uri = data if data.endswith(".json") else join(data, MANIFEST)
    try:
        load_manifest(uri, endpoint_url)
    except DataSourceError as err:
        raise EvalError(f"{where} was trained on {uri}, which cannot be read now ({err}); {PASS_DATA}") from err
    origin = "the manifest the checkpoint was trained on"
    if path:
        origin = f"the manifest {where} was trained on; {'; '.join(path)}"
    return TrainingManifest(uri, origin)


def manifest_rows(
    uri: str,
    split: str,
    max_sequences: Optional[int] = None,
    endpoint_url: Optional[str] = None,
    *,
    enc: Optional[tiktoken.Encoding] = None,
) -> tuple[np.ndarray, dict]:
    """(int64 [n, seq_len + 1] rows, the manifest): the first ``max_sequences`` rows (all when None) of a
    manifest's split in file order (``data_pipeline.shard_reader.split_rows``: no Ray), the rows training's
    validation scores; checked against ``enc`` when given (``check_tokenizer``)."""
    from data_pipeline.manifest import read_manifest
    from data_pipeline.shard_reader import split_rows

    manifest = read_manifest(uri, endpoint_url)
    if enc is not None:
        check_tokenizer(manifest, enc)
    if split not in manifest["splits"]:
        raise EvalError(f"split {split!r} not in {manifest['uri']} (has {sorted(manifest['splits'])})")
    rows = split_rows(manifest, split, num_sequences=max_sequences, endpoint_url=endpoint_url)
    if len(rows) == 0:
        raise EvalError(f"{manifest['uri']}: split {split!r} holds no sequences; score another split or manifest")
    return rows, manifest


def check_tokenizer(manifest: dict, enc: tiktoken.Encoding) -> None:
    """ManifestMismatchError unless ``manifest``'s shards were tokenized with ``enc`` (the checkpoint's)."""
    from data_pipeline.manifest import ManifestMismatchError

    tok_hash = manifest["tokenizer"]["hash"]
    if not enc.name.endswith(tok_hash[:12]):  # data_pipeline.tokenizer.encoding names it by its hash
        raise ManifestMismatchError(
            f"{manifest['uri']}: tokenized with {tok_hash[:12]}, but the checkpoint's "
            f"tokenizer is {enc.name}; evaluate on data prepared with the checkpoint's tokenizer"
        )
