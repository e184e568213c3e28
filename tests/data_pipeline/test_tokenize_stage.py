"""prepare's tokenize stage in Ray tasks: every document gets exactly tiktoken's ``encode_ordinary`` ids
plus ``<|endoftext|>``, whatever its text holds (a literal "<|endoftext|>" is ordinary text)."""

from __future__ import annotations

import pyarrow as pa
import ray

from data_pipeline import tokenizer as tok
from data_pipeline.clean import content_hash
from data_pipeline.prepare import tokenize_stage
from data_pipeline.storage import embedded_corpus_dir

ODD_TEXTS = ["", "a <|endoftext|> b<|endoftext|>", "<|endo", "naïve café 東京 🎭\u2028\t\n\n  x", " " * 7]


def test_stage_ids_are_encode_ordinary_plus_eot(ray_session):
    play = (embedded_corpus_dir() / "lovers_complaint_gut.txt").read_text(encoding="utf-8")
    texts = [play[i : i + 3000] for i in range(0, 12_000, 1500)] + ODD_TEXTS
    spec = tok.train_bpe([play], 600, "gpt4")
    enc, eot = tok.encoding(spec), tok.eot_id(spec)
    rows = [
        {"doc_hash": content_hash(f"{i}:{t}"), "split": i % 2, "text": t, "source": "x"} for i, t in enumerate(texts)
    ]
    # several blocks of several documents: batches that pack more than one document's ids
    blocks = [pa.Table.from_pylist(rows[i : i + 4]).cast(_schema()) for i in range(0, len(rows), 4)]
    out = {r["doc_hash"]: r for r in tokenize_stage(ray.data.from_arrow(blocks), spec).take_all()}
    assert len(out) == len(rows)
    for row in rows:
        got = out[row["doc_hash"]]
        want = enc.encode_ordinary(row["text"]) + [eot]
        assert list(got["tokens"]) == want, row["text"][:40]
        assert got["num_tokens"] == len(want) and got["split"] == row["split"]


def _schema() -> pa.Schema:
    return pa.schema([("doc_hash", pa.string()), ("split", pa.int8()), ("text", pa.string()), ("source", pa.string())])
