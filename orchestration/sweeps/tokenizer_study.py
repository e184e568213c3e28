"""`raylm tokenizers`: which tokenizer gives the lowest bits per byte for the same training compute.

text (the corpus's .txt documents, cleaned, split by work) -> one codec per ``study.tokenizers``
entry, trained on train text only (``data_pipeline.codecs``) -> the train and val text encoded ->
the same GPT (the ``model`` section at the codec's vocab) trained for ``study.train_flops`` ->
val loss in bits per byte and characters per token -> tokenizer_study.json, tokenizer_study.md,
config.yaml, and the report (``report.tokenizers``).

Equal compute means equal training FLOPs (``model.flops.flops_per_token``, 6N + attention, the lm
head included): a bigger vocabulary costs more per token, so it trains fewer tokens, each covering
more text. Bits per byte = summed NLL (nats) of the val targets / ln 2 / the UTF-8 bytes those
targets decode to: the one loss that compares across vocabularies. Every model sees block_size
tokens of context, so a longer token also reaches further back in bytes; that is part of what a
tokenizer buys and is reported as characters per token.

Training runs in this process with a bare torch loop, not Ray Train: a handful of ~1M-parameter
models on one machine for a minute or two each, where a Ray Train run per tokenizer would add worker
start-up and a ``raylm prepare`` of shards per vocabulary to every point. The model is the one
``model.build`` gives the trainer, with the trainer's AdamW groups and LR schedule.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from data_pipeline.codecs import Codec, train_codec
from model.flops import count_params, flops_per_token
from orchestration.sweeps.config import TokenizerStudyConfig


@dataclass
class StudyText:
    """The study's text: train and val documents each joined by a blank line (plain text, so every
    tokenizer encodes the joins alike and no special token is needed)."""

    train: str
    val: str
    train_documents: int
    val_documents: int
    val_works: list[str]


def load_study_text(study: TokenizerStudyConfig) -> StudyText:
    """Read ``study.corpus`` (.txt, one document per file), clean each document with the pipeline's
    default steps (markup, NFC, whitespace, Project Gutenberg boilerplate), split by work as
    ``raylm prepare`` does (``study.split_by``, ``val_fraction``, ``split_seed``), and keep
    ``study.val_bytes`` of val: the same share from the start of every val document, so each val
    work is scored."""
    from data_pipeline.clean import clean_text, content_hash, decode_utf8
    from data_pipeline.config import CleanConfig
    from data_pipeline.shards import split_of, work_of
    from data_pipeline.storage import (
        EMBEDDED_CORPUS,
        EMBEDDED_GLOB,
        DataSourceError,
        embedded_corpus_dir,
        filesystem_for,
        list_files,
    )

    sides: dict[int, list[str]] = {0: [], 1: []}
    val_works = []
    for uri in study.corpus:
        if uri == EMBEDDED_CORPUS or uri.startswith(f"{EMBEDDED_CORPUS}:"):
            import pyarrow.fs as pafs

            fs, path = pafs.LocalFileSystem(), f"{embedded_corpus_dir()}/{uri.partition(':')[2] or EMBEDDED_GLOB}"
        else:
            fs, path = filesystem_for(uri)
        for info in list_files(uri, fs, path, (".txt",)):
            with fs.open_input_stream(info.path) as f:
                text, _ = clean_text(decode_utf8(f.read())[0], CleanConfig())
            if not text:
                continue
            work, grouped = work_of(info.path, "", content_hash(text), study.split_by)
            side = split_of(work, study.val_fraction, study.split_seed)
            sides[side].append(text)
            if side:
                val_works.append(work if grouped else info.path.rsplit("/", 1)[-1])  # a file's name, not its hash
    if not sides[0] or not sides[1]:
        raise DataSourceError(
            f"study.corpus {study.corpus}: {len(sides[0])} train and {len(sides[1])} val documents; both sides need "
            "text (raise study.val_fraction, change study.split_seed, or add documents)"
        )
    share = study.val_bytes // len(sides[1])
    val = "\n\n".join(doc.encode("utf-8")[:share].decode("utf-8", errors="ignore") for doc in sides[1])
    return StudyText("\n\n".join(sides[0]), val, len(sides[0]), len(sides[1]), sorted(set(val_works)))


def parse_tokenizer(entry: str) -> tuple[str, int]:
    """A ``study.tokenizers`` entry -> (kind, vocab): "byte" -> ("byte", 256), "bpe:4096" -> ("bpe", 4096)."""
    kind, _, size = entry.partition(":")
    return kind, int(size) if size else 256


def spread_sample(text: str, num_bytes: int, pieces: int = 64) -> list[str]:
    """About ``num_bytes`` of ``text`` as ``pieces`` slices spread evenly over it, so a tokenizer
    trained on a sample sees every part of the corpus, not its first works alone."""
    data = text.encode("utf-8")
    if len(data) <= num_bytes:
        return [text]
    stride, size = len(data) // pieces, num_bytes // pieces
    return [data[i * stride : i * stride + size].decode("utf-8", errors="ignore") for i in range(pieces)]


def steps_for_budget(train_flops: float, flops_per_token_: float, tokens_per_step: int) -> int:
    """Optimizer steps that spend at most ``train_flops`` (at least one)."""
    return max(1, int(train_flops // (flops_per_token_ * tokens_per_step)))


def eval_windows(ids: np.ndarray, seq_len: int) -> list[np.ndarray]:
    """Windows of seq_len + 1 tokens at stride seq_len, the last one shorter: every token but the
    first is a target exactly once."""
    return [ids[i : i + seq_len + 1] for i in range(0, len(ids) - 1, seq_len)]


@torch.no_grad()
def score_text(model, windows: list[np.ndarray], token_bytes: np.ndarray, batch_size: int) -> dict:
    """{"loss" (nats/token), "bits_per_byte", "tokens", "bytes"} of ``model`` on ``windows``: the
    summed NLL of every target over ln 2 and the bytes those targets decode to."""
    from orchestration.evaluate.text_metrics import bits_per_byte

    model.eval()
    full = [w for w in windows if len(w) == len(windows[0])]
    batches = [np.stack(full[i : i + batch_size]) for i in range(0, len(full), batch_size)]
    batches += [w[None] for w in windows[len(full) :]]
    nll, tokens, num_bytes = 0.0, 0, 0
    for batch in batches:
        x = torch.from_numpy(batch.astype(np.int64))
        _, loss = model(x[:, :-1], x[:, 1:])
        nll += float(loss) * x[:, 1:].numel()
        tokens += x[:, 1:].numel()
        num_bytes += int(token_bytes[batch[:, 1:]].sum())
    return {"loss": nll / tokens, "bits_per_byte": bits_per_byte(nll, num_bytes), "tokens": tokens, "bytes": num_bytes}


def train_model(model, train_ids: np.ndarray, steps: int, study: TokenizerStudyConfig) -> list[dict]:
    """Train ``model`` in place for ``steps`` on random windows of block_size + 1 tokens of
    ``train_ids`` (window starts drawn from ``study.seed``); returns the mean training loss of every
    ``study.log_interval`` steps as [{"step", "loss"}]."""
    from orchestration.train.engine import param_groups, set_lr
    from orchestration.train.schedule import lr_at

    seq_len = model.cfg.block_size
    if len(train_ids) < seq_len + 2:
        raise ValueError(f"the train text is {len(train_ids)} tokens, shorter than one window of {seq_len + 1}")
    optimizer = torch.optim.AdamW(param_groups(model, study.weight_decay), lr=study.lr, betas=(0.9, 0.95))
    rng = np.random.default_rng(study.seed)
    offsets = np.arange(seq_len + 1)
    curve, window_loss = [], []
    model.train()
    for step in range(steps):
        starts = rng.integers(0, len(train_ids) - seq_len - 1, study.batch_size)
        batch = torch.from_numpy(train_ids[starts[:, None] + offsets].astype(np.int64))
        lr = lr_at(step, lr=study.lr, min_lr=study.min_lr, warmup_steps=study.warmup_steps, total_steps=steps)
        set_lr(optimizer, lr)
        _, loss = model(batch[:, :-1], batch[:, 1:])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if study.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), study.grad_clip)
        optimizer.step()
        window_loss.append(loss.item())
        if (step + 1) % study.log_interval == 0 or step == steps - 1:
            curve.append({"step": step + 1, "loss": float(np.mean(window_loss))})
            window_loss = []
    return curve


def study_one(entry: str, text: StudyText, model_cfg, study: TokenizerStudyConfig) -> dict:
    """Train one tokenizer and one model at the study's budget; the study's row for it."""
    from model.build import build_model
    from model.config import with_vocab_size

    kind, vocab_size = parse_tokenizer(entry)
    started = t0 = time.perf_counter()
    codec = train_codec(kind, vocab_size, spread_sample(text.train, study.tokenizer_train_bytes), study.pattern)
    tokenizer_s = time.perf_counter() - t0
    train_ids, val_ids = (np.asarray(encode_exactly(codec, t), dtype=np.int64) for t in (text.train, text.val))
    cfg = with_vocab_size(model_cfg, codec.n_vocab)
    seq_len = cfg.block_size
    per_token = flops_per_token(cfg, seq_len)
    steps = steps_for_budget(study.train_flops, per_token, study.batch_size * seq_len)
    torch.manual_seed(study.seed)
    model = build_model(cfg)
    t0 = time.perf_counter()
    curve = train_model(model, train_ids, steps, study)
    train_s = time.perf_counter() - t0
    scores = score_text(model, eval_windows(val_ids, seq_len), codec.token_bytes, study.batch_size)
    train_bytes_per_token = len(text.train.encode("utf-8")) / len(train_ids)
    train_tokens = steps * study.batch_size * seq_len
    for point in curve:  # training loss on the bits-per-byte scale, at the train text's bytes per token
        point["bits_per_byte"] = point["loss"] / math.log(2) / train_bytes_per_token
        point["train_flops"] = point["step"] * study.batch_size * seq_len * per_token
    return {
        "tokenizer": codec.name,
        "kind": kind,
        "vocab_size": codec.n_vocab,
        "chars_per_token": len(text.val) / len(val_ids),
        "bytes_per_token": len(text.val.encode("utf-8")) / len(val_ids),
        "params": count_params(cfg),
        "non_embedding_params": count_params(cfg, non_embedding=True),
        "flops_per_token": per_token,
        "steps": steps,
        "train_tokens": train_tokens,
        "train_bytes": int(train_tokens * train_bytes_per_token),
        "train_flops": train_tokens * per_token,
        "val_loss": scores["loss"],
        "val_bits_per_byte": scores["bits_per_byte"],
        "val_tokens": scores["tokens"],
        "val_bytes": scores["bytes"],
        "tokenizer_train_s": tokenizer_s,
        "train_s": train_s,
        "wall_s": time.perf_counter() - started,  # tokenizer training, encoding, model training and scoring
        "curve": curve,
    }


def encode_exactly(codec: Codec, text: str) -> list[int]:
    """``codec.encode(text)``, checked to stand for exactly the text's bytes: what bits per byte divides
    by must be the text itself."""
    ids = codec.encode(text)
    encoded, actual = int(codec.token_bytes[ids].sum()), len(text.encode("utf-8"))
    if encoded != actual:
        raise ValueError(f"{codec.name}: {len(ids)} tokens stand for {encoded} bytes, the text has {actual}")
    return ids


def run_tokenizer_study(cfg, out: str) -> dict:
    """Run the study of ``cfg`` (a ``TokenizerStudyRunConfig``) and write its files into ``out``;
    returns what tokenizer_study.json holds."""
    import yaml

    from orchestration.artifacts import (
        CONFIG_FILE,
        TOKENIZER_STUDY_FILE,
        TOKENIZER_STUDY_MARKDOWN_FILE,
        RunDir,
    )

    study = cfg.study
    torch.set_num_threads(study.threads)
    started = datetime.datetime.now(datetime.timezone.utc)
    text = load_study_text(study)
    print(
        f"[tokenizers] {text.train_documents} train documents ({len(text.train.encode()):,} bytes), val "
        f"{len(text.val.encode()):,} bytes of {text.val_documents} documents ({', '.join(text.val_works)})",
        flush=True,
    )
    rows = []
    for entry in study.tokenizers:
        row = study_one(entry, text, cfg.model, study)
        rows.append(row)
        print(
            f"[tokenizers] {row['tokenizer']}: vocab {row['vocab_size']:,}, {row['chars_per_token']:.2f} chars/token, "
            f"{row['steps']} steps ({row['train_flops']:.3g} FLOPs, {row['train_bytes']:,} bytes) in "
            f"{row['train_s']:.0f}s; val {row['val_bits_per_byte']:.4f} bits/byte",
            flush=True,
        )
    result = {
        "date": started.strftime("%Y-%m-%d"),
        "started": started.isoformat(timespec="seconds"),
        "wall_s": (datetime.datetime.now(datetime.timezone.utc) - started).total_seconds(),
        "corpus": study.corpus,
        "train_documents": text.train_documents,
        "val_documents": text.val_documents,
        "val_works": text.val_works,
        "train_text_bytes": len(text.train.encode("utf-8")),
        "val_text_bytes": len(text.val.encode("utf-8")),
        "train_flops_budget": study.train_flops,
        "rows": rows,
    }
    where = RunDir.at(out)
    where.write_text(CONFIG_FILE, yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
    where.write_json(TOKENIZER_STUDY_FILE, result)
    where.write_text(TOKENIZER_STUDY_MARKDOWN_FILE, markdown_table(result))
    return result


def markdown_table(result: dict) -> str:
    """The study's table, in the order the tokenizers were listed."""
    lines = [
        f"Tokenizers at equal training compute ({result['train_flops_budget']:.3g} FLOPs each), "
        f"{result['val_text_bytes']:,} val bytes of {', '.join(result['val_works'])} ({result['date']})",
        "",
        "| tokenizer | vocab | chars/token | val bits/byte | params | steps | train FLOPs | train bytes | wall (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['tokenizer']} | {r['vocab_size']:,} | {r['chars_per_token']:.2f} | {r['val_bits_per_byte']:.4f} | "
            f"{r['params']:,} | {r['steps']:,} | {r['train_flops']:.3g} | {r['train_bytes']:,} | "
            f"{r['wall_s']:.0f} |"
        )
    return "\n".join(lines) + "\n"
