"""`raylm demo`: prepare -> train -> eval -> generate on the embedded Shakespeare corpus, local Ray.

The README's main job. It reuses prepared shards when their manifest was built from the same data
config (prepare is deterministic, so they are the shards it would write again), trains a fresh run,
and ends with a summary that puts the validation loss next to the unigram entropy of the training
tokens: a model that learned nothing beyond token frequencies scores that entropy. Each demo run is
``runs/shakespeare-<time>``; ``runs/shakespeare/latest_run`` names the newest, so the fine-tune
configs (``checkpoint: runs/shakespeare``) start from it unmodified.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import numpy as np

from orchestration.config import PretrainConfig

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "shakespeare.yaml"


def _comparable(data_cfg: dict) -> dict:
    """A data config as a dict, without the switches that do not change the shards."""
    out = json.loads(json.dumps(data_cfg))
    out["output"].pop("overwrite", None)
    return out


def prepared_manifest(cfg: PretrainConfig) -> str:
    """The manifest URI for cfg.data: reused when it was built from the same config, else prepared."""
    import pyarrow.fs as pafs

    from data_pipeline.manifest import ManifestError, read_manifest
    from data_pipeline.prepare import prepare
    from data_pipeline.storage import filesystem_for, join

    out = cfg.data.output
    fs, path = filesystem_for(out.uri, out.endpoint_url, out.region)
    manifest = None
    if fs.get_file_info(f"{path}/manifest.json").type == pafs.FileType.File:
        try:
            manifest = read_manifest(join(out.uri, "manifest.json"), out.endpoint_url, out.region)
        except ManifestError as err:  # e.g. written by an older raylm: prepared again below
            print(f"[demo] preparing the shards again: {err}", flush=True)
    if manifest is not None and _comparable(manifest["config"]) == _comparable(dataclasses.asdict(cfg.data)):
        print(f"[demo] reusing prepared shards {manifest['uri']} (same data config)", flush=True)
        return manifest["uri"]
    data = dataclasses.replace(cfg.data, output=dataclasses.replace(out, overwrite=True))
    return prepare(data)


def _bincount(batch: dict, vocab_size: int) -> dict:
    return {"counts": np.bincount(batch["tokens"].reshape(-1).astype(np.int64), minlength=vocab_size)[None, :]}


def unigram_entropy(manifest_uri: str, endpoint_url: str | None = None) -> float:
    """Entropy in nats/token of the train split's token frequencies (counted by Ray Data workers)."""
    from data_pipeline.manifest import read_manifest
    from data_pipeline.stream import sequence_dataset

    vocab_size = int(read_manifest(manifest_uri, endpoint_url)["tokenizer"]["n_vocab"])
    ds = sequence_dataset(manifest_uri, "train", seed=0, endpoint_url=endpoint_url)
    counts = np.zeros(vocab_size, dtype=np.int64)
    for batch in ds.map_batches(_bincount, batch_size=1024, fn_kwargs={"vocab_size": vocab_size}).iter_batches(
        batch_size=None, batch_format="numpy"
    ):
        counts += batch["counts"].sum(axis=0)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def run_demo(cfg: PretrainConfig, *, prompt: str = "ROMEO:", max_new_tokens: int = 200) -> dict:
    """Run the whole pipeline once; print a summary and return it (also written to demo_summary.json)."""
    from orchestration.artifacts import DEMO_SUMMARY_FILE, RUN_FILE, RunDir, write_latest_run
    from orchestration.evaluate.lm import evaluate_lm
    from orchestration.evaluate.sample import generate_text
    from orchestration.report.write import write_report
    from orchestration.runtime import init_ray
    from orchestration.train.driver import run_dir, run_training

    t0 = time.time()
    init_ray()
    manifest_uri = prepared_manifest(cfg)
    t_prepared = time.time()
    family = run_dir(cfg.train)  # runs/shakespeare: the name configs/finetune_*.yaml start from
    run_name = f"{cfg.train.run_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, data=manifest_uri, run_name=run_name))
    trained = run_training(cfg, resume=False)
    t_trained = time.time()
    if trained["checkpoint"] is None:
        raise RuntimeError(f"training finished without a checkpoint in {trained['run_dir']}")
    if family.has(RUN_FILE):  # a `raylm train` run of that name: its own checkpoints stay what it means
        print(f"[demo] {family.uri} is a training run of its own; not pointing it at {trained['run_dir']}")
    else:
        write_latest_run(family, trained["run_dir"])
    ev = evaluate_lm(
        trained["checkpoint"], manifest_uri, split="val", max_sequences=512, endpoint_url=cfg.train.endpoint_url
    )
    entropy = unigram_entropy(manifest_uri, cfg.data.output.endpoint_url)
    sample = generate_text(
        trained["checkpoint"],
        prompt,
        max_new_tokens,
        temperature=0.8,
        top_k=50,
        seed=cfg.train.seed,
        endpoint_url=cfg.train.endpoint_url,
    )
    summary = {
        "run_dir": trained["run_dir"],
        "checkpoint": trained["checkpoint"],
        "manifest": manifest_uri,
        "steps": trained["final_step"],
        "train_tokens": trained["tokens"],
        "final_train_loss": trained["final_loss"],
        "val_loss": ev["loss"],
        "val_perplexity": ev["perplexity"],
        "val_tokens": ev["tokens"],
        "unigram_entropy": entropy,
        "unigram_perplexity": math.exp(entropy),
        "prompt": prompt,
        "sample": sample,
        "prepare_s": t_prepared - t0,
        "train_s": t_trained - t_prepared,
        "total_s": time.time() - t0,
    }
    RunDir.at(trained["run_dir"], cfg.train.endpoint_url).write_json(DEMO_SUMMARY_FILE, summary)
    report = write_report(trained["run_dir"], endpoint_url=cfg.train.endpoint_url)["report.html"]
    print("\n" + "=" * 72)
    print(f"raylm demo: {summary['steps']} steps, {summary['train_tokens']:,} training tokens")
    print(f"  val loss {ev['loss']:.3f} nats/token (perplexity {ev['perplexity']:.1f}) on {ev['tokens']:,} tokens")
    print(
        f"  unigram entropy of the data {entropy:.3f} nats/token (perplexity {math.exp(entropy):.1f}): "
        f"the model is {entropy - ev['loss']:.3f} nats/token below it"
    )
    print(
        f"  wall time: prepare {summary['prepare_s']:.0f} s, train {summary['train_s']:.0f} s, "
        f"total {summary['total_s']:.0f} s"
    )
    print(f"--- sample ---\n{prompt}{sample}\n--------------")
    print(f"run directory: {trained['run_dir']}\nreport: {report}")
    print("=" * 72)
    return summary
