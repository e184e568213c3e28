"""Baselines on the same shards and tokenizer as the transformer: an n-gram LM and a comparison table.

The n-gram model (``model.ngram``) is fitted on the train split's token stream and scored on the
same val windows ``evaluate_lm`` reads (the first ``max_sequences`` rows of the split, in file
order), with the same conventions: loss averages every target token; bits per byte sums the NLL of
the text tokens (end-of-text decodes to no bytes and is left out) over the bytes they decode to.
The recurrent baselines are checkpoints of ordinary training runs with ``model.arch=lstm``
(configs/lstm_shakespeare.yaml), ``gru`` or ``rnn`` (the same file with model.arch overridden). No Ray:
shards are read by the one shard reader (``evaluate.data_source.manifest_rows``), locally or from S3.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from model.ngram import NGramLM
from orchestration.evaluate.data_source import EvalError, manifest_rows

NGRAM_SOURCE_FILE = "ngram_source.json"


def train_ngram(
    manifest_uri: str, out_dir: str, *, n: int = 3, discount: Optional[float] = None, endpoint_url: Optional[str] = None
) -> dict:
    """Fit an interpolated Kneser-Ney n-gram model on a manifest's train split and save it.

    The train rows are consecutive chunks of the tokenized corpus (documents joined by end-of-text),
    so they are counted as one stream in file order. discount None: modified KN (D1, D2, D3+ per
    order); a number: plain interpolated KN. out_dir gets ngram.npz, ngram.json, the tokenizer files
    and ngram_source.json. Returns {"out_dir", "n", "train_tokens", "ngrams", "discounts", "fit_s"}.
    """
    from data_pipeline import tokenizer as tok
    from model.ngram import check_order

    t0 = time.perf_counter()
    rows, manifest = manifest_rows(manifest_uri, "train", endpoint_url=endpoint_url)
    vocab_size = int(manifest["tokenizer"]["n_vocab"])
    try:
        check_order(n, vocab_size)
    except ValueError as err:
        raise EvalError(f"{manifest['uri']}: {err}") from err
    spec = tok.load_spec(manifest["uri"].rsplit("/", 1)[0], endpoint_url)
    if spec["hash"] != manifest["tokenizer"]["hash"]:
        raise EvalError(
            f"{manifest['uri']}: tokenizer files next to it do not match the manifest's hash; re-run prepare"
        )
    model = NGramLM.fit(rows.reshape(-1), n, vocab_size, discount=discount)
    out = model.save(out_dir)
    for name, data in tok.to_files(spec).items():
        (out / name).write_bytes(data)
    source = {
        "manifest": manifest["uri"],
        "tokenizer_hash": spec["hash"],
        "seq_len": manifest["seq_len"],
        "discount": discount,
    }
    (out / NGRAM_SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n")
    fit_s = time.perf_counter() - t0
    ngrams = sum(len(model.tables[f"keys{k}"]) for k in range(1, n + 1))
    print(
        f"n-gram n={n}: {model.train_tokens:,} train tokens, {ngrams:,} n-grams, discounts "
        f"{[[round(d, 3) for d in ds] for ds in model.discounts]}, {fit_s:.1f}s -> {out}"
    )
    return {
        "out_dir": str(out),
        "n": n,
        "train_tokens": model.train_tokens,
        "ngrams": ngrams,
        "discounts": model.discounts,
        "fit_s": fit_s,
    }


def _windows(
    data: str,
    enc,
    seq_len: int,
    split: str,
    max_sequences: int,
    endpoint_url: Optional[str],
    tokenizer_hash: Optional[str],
) -> np.ndarray:
    """The eval windows evaluate_lm reads: a manifest's split rows, or a text file cut into windows."""
    if data.endswith(".json"):
        rows, manifest = manifest_rows(data, split, max_sequences, endpoint_url)
        if tokenizer_hash is not None and manifest["tokenizer"]["hash"] != tokenizer_hash:
            raise EvalError(
                f"{data}: shards use tokenizer {manifest['tokenizer']['hash'][:12]}, the model was "
                f"fitted with {tokenizer_hash[:12]}; evaluate on data prepared with the same tokenizer"
            )
        return rows[:, : seq_len + 1]
    from orchestration.evaluate.lm import token_windows

    return token_windows(data, enc, seq_len, max_sequences, split, endpoint_url)


def _nll_metrics(nll: np.ndarray, targets: np.ndarray, byte_len: np.ndarray) -> dict:
    """lm_metrics' numbers from per-target NLL (nats) [N, T] and target ids [N, T]."""
    from orchestration.evaluate.text_metrics import bits_per_byte

    target_bytes = byte_len[targets]
    is_text = target_bytes > 0
    loss = float(nll.mean())
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 50.0)),
        "bits_per_byte": bits_per_byte(float(nll[is_text].sum()), int(target_bytes.sum())),
        "tokens": int(targets.size),
        "bytes": int(target_bytes.sum()),
        "bpb_tokens": int(is_text.sum()),
    }


def load_ngram(model_dir: str) -> tuple[NGramLM, object, dict]:
    """(model, tokenizer, ngram_source.json) from a ``train_ngram`` output directory."""
    from data_pipeline import tokenizer as tok

    model = NGramLM.load(model_dir)
    source_file = Path(model_dir) / NGRAM_SOURCE_FILE
    if not source_file.exists():
        raise FileNotFoundError(f"{model_dir}: no {NGRAM_SOURCE_FILE}; not a train_ngram output directory")
    source = json.loads(source_file.read_text())
    return model, tok.encoding(tok.load_spec(model_dir)), source


def evaluate_ngram(
    model_dir: str, data: str, *, split: str = "val", max_sequences: int = 256, endpoint_url: Optional[str] = None
) -> dict:
    """Score a saved n-gram model on ``data`` (a manifest's split, or a text file) ->
    {"loss", "perplexity", "bits_per_byte", "tokens", "bytes", "bpb_tokens", "sequences", "n"}."""
    from orchestration.evaluate.lm import token_byte_lengths

    model, enc, source = load_ngram(model_dir)
    windows = _windows(data, enc, source["seq_len"], split, max_sequences, endpoint_url, source["tokenizer_hash"])
    if len(windows) == 0:
        raise EvalError(f"{data}: fewer than {source['seq_len'] + 1} tokens, nothing to evaluate")
    nll = model.window_nll(windows)
    return {**_nll_metrics(nll, windows[:, 1:], token_byte_lengths(enc)), "sequences": int(len(windows)), "n": model.n}


def _neural_row(
    name: str, checkpoint: str, rows: np.ndarray, seq_len: int, batch_size: int, endpoint_url: Optional[str]
) -> dict:
    from model.flops import count_params, flops_per_token
    from orchestration.evaluate.lm import lm_metrics
    from orchestration.evaluate.load import load_checkpoint_model

    model, cfg, enc, meta = load_checkpoint_model(checkpoint, endpoint_url=endpoint_url)
    if name != "transformer" and cfg.arch != name:
        raise EvalError(f"{checkpoint}: given as the {name} baseline, but its model.arch is {cfg.arch!r}")
    metrics = lm_metrics(model, enc, rows[:, : cfg.block_size + 1], batch_size=batch_size)
    train_tokens = int(meta.get("consumed_sequences", 0)) * seq_len
    return {
        "model": name,
        "arch": cfg.arch,
        "params": count_params(cfg),
        "non_embedding_params": count_params(cfg, non_embedding=True),
        "train_tokens": train_tokens,
        "flops_per_token": flops_per_token(cfg, seq_len),
        "train_flops": flops_per_token(cfg, seq_len) * train_tokens,
        **metrics,
        "source": meta["checkpoint_uri"],
    }


def compare_baselines(
    manifest_uri: str,
    *,
    transformer_checkpoint: str,
    lstm_checkpoint: Optional[str] = None,
    gru_checkpoint: Optional[str] = None,
    rnn_checkpoint: Optional[str] = None,
    ngram_dir: Union[str, Sequence[str], None] = None,
    out_dir: Optional[str] = None,
    split: str = "val",
    max_sequences: int = 256,
    batch_size: int = 8,
    endpoint_url: Optional[str] = None,
) -> dict:
    """Val loss / perplexity / bits per byte / params / training FLOPs of every model on the same
    windows of ``manifest_uri``'s split -> {"rows": [...], "split", "sequences", "manifest"}.

    Checkpoints are URIs ``load_checkpoint_model`` accepts (a checkpoint or a run directory), each
    recurrent one of the arch it is given as;
    ngram_dir one or several ``train_ngram`` outputs (no FLOPs: counting is not matmul work). With
    out_dir, writes baselines.json and baselines.md (a markdown table) there.
    """
    rows, manifest = manifest_rows(manifest_uri, split, max_sequences, endpoint_url)
    seq_len = manifest["seq_len"]
    table = [_neural_row("transformer", transformer_checkpoint, rows, seq_len, batch_size, endpoint_url)]
    for arch, checkpoint in (("lstm", lstm_checkpoint), ("gru", gru_checkpoint), ("rnn", rnn_checkpoint)):
        if checkpoint is not None:
            table.append(_neural_row(arch, checkpoint, rows, seq_len, batch_size, endpoint_url))
    ngram_dirs = [ngram_dir] if isinstance(ngram_dir, str) else list(ngram_dir or [])
    for d in ngram_dirs:
        metrics = evaluate_ngram(
            d, manifest["uri"], split=split, max_sequences=max_sequences, endpoint_url=endpoint_url
        )
        model = NGramLM.load(d)
        table.append(
            {
                "model": f"{metrics.pop('n')}-gram KN",
                "arch": "ngram",
                "params": None,
                "non_embedding_params": None,
                "train_tokens": model.train_tokens,
                "flops_per_token": None,
                "train_flops": None,
                "ngrams": sum(len(model.tables[f"keys{k}"]) for k in range(1, model.n + 1)),
                **{k: v for k, v in metrics.items() if k != "sequences"},
                "source": str(d),
            }
        )
    result = {"manifest": manifest["uri"], "split": split, "sequences": int(len(rows)), "rows": table}
    if out_dir is not None:
        from orchestration.artifacts import BASELINES_FILE, BASELINES_MARKDOWN_FILE, RunDir

        out = RunDir.at(out_dir, endpoint_url)
        written = out.write_json(BASELINES_FILE, result)
        out.write_text(BASELINES_MARKDOWN_FILE, markdown_table(result))
        print(f"baselines: {len(table)} models on {len(rows)} {split} windows -> {written}")
    return result


def markdown_table(result: dict) -> str:
    """A markdown table of ``compare_baselines``' rows, lowest bits per byte first."""

    def fmt(x, spec):
        return "-" if x is None else format(x, spec)

    lines = [
        f"Baselines on {result['sequences']} {result['split']} windows of `{result['manifest']}`",
        "",
        "| model | params | train tokens | train FLOPs | loss | perplexity | bits/byte |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(result["rows"], key=lambda r: r["bits_per_byte"]):
        lines.append(
            f"| {r['model']} | {fmt(r['params'], ',')} | {fmt(r['train_tokens'], ',')} | "
            f"{fmt(r['train_flops'], '.3g')} | {r['loss']:.4f} | {r['perplexity']:.2f} | "
            f"{r['bits_per_byte']:.4f} |"
        )
    return "\n".join(lines) + "\n"
