"""Language-model metrics of a checkpoint on held-out text: loss, perplexity, bits per byte.

Held-out text is a manifest's split (its first rows, in file order: the rows training's validation
scores, read in this process without Ray) or a text file cut into non-overlapping windows of the
model's context.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import tiktoken
import torch

from model.gpt import GPT
from orchestration.evaluate.data_source import EvalError
from orchestration.evaluate.load import loaded_checkpoint


def token_windows(
    data: str, enc: tiktoken.Encoding, seq_len: int, max_sequences: int, split: str, endpoint_url: Optional[str]
) -> np.ndarray:
    """[n, seq_len + 1] token windows from a manifest's split (its first rows in file order, tokenized
    with ``enc``) or from a text file."""
    if data.endswith(".json"):
        from orchestration.evaluate.data_source import manifest_rows

        return manifest_rows(data, split, max_sequences, endpoint_url, enc=enc)[0][:, : seq_len + 1]
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
    """{"loss", "perplexity", "bits_per_byte", "tokens", "bytes", "bpb_tokens", "sequences", "checkpoint"}
    of a checkpoint on ``data``'s windows (a manifest's ``split``, or a text file); ``checkpoint_uri``
    may also be the tuple ``load_checkpoint_model`` returned, so several evals load the weights once."""
    model, model_cfg, enc, meta = loaded_checkpoint(checkpoint_uri, endpoint_url=endpoint_url, device=device)
    seqs = token_windows(data, enc, model_cfg.block_size, max_sequences, split, endpoint_url)
    if len(seqs) == 0:
        raise EvalError(f"{data}: fewer than {model_cfg.block_size + 1} tokens, nothing to evaluate")
    return {
        **lm_metrics(model, enc, seqs, batch_size=batch_size),
        "sequences": int(len(seqs)),
        "checkpoint": meta["checkpoint_uri"],
    }
