"""Eval and generation from a consolidated checkpoint: plain PyTorch, no Ray Train, no DeepSpeed.

A checkpoint URI is a ``checkpoint_<step>`` directory or a run directory (its newest complete
checkpoint is used), local or on object storage.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np
import tiktoken
import torch

from model.config import ModelConfig
from model.gpt import GPT
from model.lstm import build_model
from orchestration.train.checkpoint import (
    META_FILE,
    MODEL_CONFIG_FILE,
    MODEL_FILE,
    CheckpointError,
    is_complete,
    latest_complete_checkpoint,
    load_consolidated_state,
    load_weights,
)


def _resolve(uri: str, endpoint_url: Optional[str]) -> str:
    """A complete checkpoint dir for ``uri`` (itself, or a run dir's newest complete checkpoint)."""
    from data_pipeline.storage import filesystem_for

    fs, path = filesystem_for(uri, endpoint_url)
    if is_complete(fs, path) is not None:
        return uri
    latest = latest_complete_checkpoint(uri, endpoint_url)
    if latest is None:
        raise CheckpointError(
            f"{uri}: neither a complete checkpoint (with {META_FILE}) nor a run directory "
            "holding one; pass a checkpoint_<step> directory or a run directory"
        )
    return latest[0]


def _local_copy(uri: str, endpoint_url: Optional[str]) -> str:
    """Local directory with the checkpoint's inference files (downloads them from object storage)."""
    from data_pipeline.storage import filesystem_for, read_bytes

    if "://" not in uri:
        return uri
    fs, path = filesystem_for(uri, endpoint_url)
    meta = is_complete(fs, path)
    local = Path(tempfile.mkdtemp(prefix="raylm_ckpt_"))
    wanted = [f for f in meta["files"] if not f.startswith("ds/") and not f.startswith("rng_rank")] + [META_FILE]
    for name in wanted:
        (local / name).write_bytes(read_bytes(f"{uri.rstrip('/')}/{name}", endpoint_url))
    return str(local)


def load_checkpoint_model(
    uri: str, *, endpoint_url: Optional[str] = None, device: str = "cpu"
) -> tuple[GPT, ModelConfig, tiktoken.Encoding, dict]:
    """(model in eval mode, its ModelConfig, the tokenizer, checkpoint meta) from a checkpoint URI."""
    from data_pipeline.tokenizer import encoding, load_spec

    ckpt_uri = _resolve(uri, endpoint_url)
    local = _local_copy(ckpt_uri, endpoint_url)
    state, cfg_dict, _, meta = load_consolidated_state(local)
    model_cfg = ModelConfig(**cfg_dict)
    model = build_model(model_cfg)  # GPT, or LSTMLM for arch "lstm"
    load_weights(model, state, f"{ckpt_uri}/{MODEL_FILE} (with its {MODEL_CONFIG_FILE})")
    model.to(device).eval()
    meta = {**meta, "checkpoint_uri": ckpt_uri}
    return model, model_cfg, encoding(load_spec(local)), meta


def _sequences(
    data: str, enc: tiktoken.Encoding, seq_len: int, max_sequences: int, split: str, endpoint_url: Optional[str]
) -> np.ndarray:
    """[n, seq_len + 1] token windows from a manifest's split or from a text file."""
    if data.endswith(".json"):
        from data_pipeline.loader import sequence_dataset

        ds = sequence_dataset(data, split, seed=0, num_sequences=max_sequences)
        rows = [np.asarray(r["tokens"], dtype=np.int64) for r in ds.take(max_sequences)]
        return np.stack(rows)[:, : seq_len + 1] if rows else np.zeros((0, seq_len + 1), np.int64)
    from data_pipeline.storage import read_bytes

    tokens = np.asarray(
        enc.encode(read_bytes(data, endpoint_url).decode("utf-8"), allowed_special="all"), dtype=np.int64
    )
    n = min((len(tokens) - 1) // seq_len, max_sequences)
    return (
        np.stack([tokens[i * seq_len : i * seq_len + seq_len + 1] for i in range(n)])
        if n
        else np.zeros((0, seq_len + 1), np.int64)
    )


@torch.no_grad()
def evaluate(
    checkpoint_uri: str,
    data: str,
    *,
    split: str = "val",
    max_sequences: int = 256,
    batch_size: int = 8,
    endpoint_url: Optional[str] = None,
    device: str = "cpu",
) -> dict:
    """Mean next-token loss of a checkpoint on ``data`` (a manifest URI's ``split``, or a text file).

    Returns {"loss", "perplexity", "tokens", "sequences", "checkpoint"}. Text files are cut into
    non-overlapping windows of the model's context length.
    """
    model, model_cfg, enc, meta = load_checkpoint_model(checkpoint_uri, endpoint_url=endpoint_url, device=device)
    seqs = _sequences(data, enc, model_cfg.block_size, max_sequences, split, endpoint_url)
    if len(seqs) == 0:
        raise ValueError(f"{data}: fewer than {model_cfg.block_size + 1} tokens, nothing to evaluate")
    total_loss, total_tokens = 0.0, 0
    for i in range(0, len(seqs), batch_size):
        batch = torch.from_numpy(seqs[i : i + batch_size]).to(device)
        _, loss = model(batch[:, :-1], batch[:, 1:])
        n = batch[:, 1:].numel()
        total_loss += float(loss) * n
        total_tokens += n
    loss = total_loss / total_tokens
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 50.0)),
        "tokens": total_tokens,
        "sequences": int(len(seqs)),
        "checkpoint": meta["checkpoint_uri"],
    }


def generate_text(
    checkpoint_uri: str,
    prompt: str,
    max_new_tokens: int = 200,
    *,
    temperature: float = 0.8,
    top_k: Optional[int] = 50,
    top_p: Optional[float] = None,
    seed: Optional[int] = None,
    endpoint_url: Optional[str] = None,
    device: str = "cpu",
) -> str:
    """The prompt's continuation (new text only) sampled from a checkpoint; stops at end-of-text."""
    from data_pipeline.tokenizer import EOT
    from model.generate import generate

    model, _, enc, _ = load_checkpoint_model(checkpoint_uri, endpoint_url=endpoint_url, device=device)
    eot = enc.encode_single_token(EOT)
    ids = enc.encode(prompt, allowed_special="all") or [eot]  # an empty prompt starts a new document
    new = generate(
        model, [ids], max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, eos_id=eot, seed=seed
    )[0]
    return enc.decode([t for t in new if t != eot])


def loaded_checkpoint(
    checkpoint, *, endpoint_url: Optional[str] = None, device: str = "cpu"
) -> tuple[GPT, ModelConfig, tiktoken.Encoding, dict]:
    """``load_checkpoint_model``'s (model, config, tokenizer, meta) for a URI; an already loaded tuple
    passes through, so a caller running several evals loads the weights once."""
    if isinstance(checkpoint, str):
        return load_checkpoint_model(checkpoint, endpoint_url=endpoint_url, device=device)
    return checkpoint


def token_byte_lengths(enc: tiktoken.Encoding) -> np.ndarray:
    """UTF-8 bytes each token id decodes to; 0 for special tokens (end-of-text is no text)."""
    special = {enc.encode_single_token(s) for s in enc.special_tokens_set}
    return np.array(
        [0 if i in special else len(enc.decode_single_token_bytes(i)) for i in range(enc.n_vocab)], dtype=np.int64
    )


@torch.no_grad()
def lm_metrics(model: GPT, enc: tiktoken.Encoding, seqs: np.ndarray, *, batch_size: int = 8) -> dict:
    """Loss, perplexity and bits per byte of ``model`` on token windows [n, T + 1] (inputs [:, :-1],
    targets [:, 1:]) -> {"loss", "perplexity", "bits_per_byte", "tokens", "bytes", "bpb_tokens"}.

    loss and perplexity average every target token, as ``evaluate`` does. Bits per byte sums the
    NLL of the targets that are text (``bpb_tokens``: special tokens decode to no bytes and are left
    out, as nanochat does) over the bytes exactly those targets decode to.
    """
    from orchestration.evaluate.text_metrics import bits_per_byte

    if len(seqs) == 0:
        raise ValueError("lm_metrics: no token windows to evaluate")
    device = next(model.parameters()).device
    byte_len = torch.from_numpy(token_byte_lengths(enc)).to(device)
    total_nll = text_nll = 0.0
    tokens = text_tokens = num_bytes = 0
    for i in range(0, len(seqs), batch_size):
        batch = torch.from_numpy(np.asarray(seqs[i : i + batch_size], dtype=np.int64)).to(device)
        targets = batch[:, 1:]
        logits, _ = model(batch[:, :-1])
        nll = torch.nn.functional.cross_entropy(
            logits.float().flatten(0, 1), targets.reshape(-1), reduction="none"
        ).view_as(targets)
        target_bytes = byte_len[targets]
        is_text = target_bytes > 0
        total_nll += float(nll.sum())
        tokens += targets.numel()
        text_nll += float(nll[is_text].sum())
        text_tokens += int(is_text.sum())
        num_bytes += int(target_bytes.sum())
    loss = total_nll / tokens
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 50.0)),
        "bits_per_byte": bits_per_byte(text_nll, num_bytes),
        "tokens": tokens,
        "bytes": num_bytes,
        "bpb_tokens": text_tokens,
    }


def evaluate_lm(
    checkpoint_uri,
    data: str,
    *,
    split: str = "val",
    max_sequences: int = 256,
    batch_size: int = 8,
    endpoint_url: Optional[str] = None,
    device: str = "cpu",
) -> dict:
    """``evaluate`` plus bits per byte: {"loss", "perplexity", "bits_per_byte", "tokens", "bytes",
    "bpb_tokens", "sequences", "checkpoint"} on the same windows ``evaluate`` reads (manifest split or
    text file). ``checkpoint_uri`` may also be a tuple ``load_checkpoint_model`` returned."""
    model, model_cfg, enc, meta = loaded_checkpoint(checkpoint_uri, endpoint_url=endpoint_url, device=device)
    seqs = _sequences(data, enc, model_cfg.block_size, max_sequences, split, endpoint_url)
    if len(seqs) == 0:
        raise ValueError(f"{data}: fewer than {model_cfg.block_size + 1} tokens, nothing to evaluate")
    return {
        **lm_metrics(model, enc, seqs, batch_size=batch_size),
        "sequences": int(len(seqs)),
        "checkpoint": meta["checkpoint_uri"],
    }
