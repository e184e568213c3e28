"""The privacy audit's planted text (data_pipeline.plant): what is planted, how often, and what dedup sees."""

from __future__ import annotations

import pytest

from data_pipeline.clean import content_hash
from data_pipeline.config import AuditConfig, NearDedupConfig
from data_pipeline.plant import AUDIT_SOURCE, AuditPlanError, corpus_lines, plan_audit, planted_table
from data_pipeline.storage import embedded_corpus_dir

AUDIT = AuditConfig(
    enabled=True,
    canary_digits=3,
    canary_repetitions=[1, 4],
    canaries_per_count=2,
    never_planted_canaries=16,
    passages=5,
    passage_repetitions=[1, 3],
    passage_lines=3,
    filler_lines=4,
)


@pytest.fixture(scope="module")
def lines() -> list[str]:
    text = sorted(embedded_corpus_dir().glob("*_gut.txt"))[0].read_text(encoding="utf-8", errors="replace")
    return corpus_lines([text[:60_000]])


def test_counts_copies_and_controls(lines):
    record, documents = plan_audit(AUDIT, lines)
    canaries, passages = record["canaries"], record["passages"]
    assert [c["repetitions"] for c in canaries] == [1, 1, 4, 4] + [0] * 16
    assert len({c["secret"] for c in canaries}) == 20 and all(len(c["secret"]) == 3 for c in canaries)
    assert [p["repetitions"] for p in passages] == [1] * 5 + [3] * 5 + [0] * 5
    assert [p["member"] for p in passages] == [True] * 10 + [False] * 5
    by_source: dict[str, list[str]] = {}
    for source, _, text in documents:
        by_source.setdefault(source, []).append(text)
    assert record["planted_documents"] == len(documents) == 2 * (1 + 4) + 5 * (1 + 3)
    for c in canaries:  # never-planted canaries are nowhere in the planted text
        copies = by_source.get(AUDIT_SOURCE + c["id"], [])
        assert len(copies) == c["repetitions"]
        line = AUDIT.canary_template.replace("{secret}", c["secret"])
        assert all(t.startswith(line + "\n") and len(t.splitlines()) == 1 + AUDIT.filler_lines for t in copies)
        assert sum(line in t for texts in by_source.values() for t in texts) == c["repetitions"]
        assert len({content_hash(t) for t in copies}) == len(copies)  # different filler: dedup keeps every copy
    for p in passages:
        copies = by_source.get(AUDIT_SOURCE + p["id"], [])
        assert copies == [p["text"]] * p["repetitions"]  # identical copies: exact dedup keeps one
        assert all(line in lines for line in p["text"].splitlines())
    assert len({p["text"] for p in passages}) == len(passages)  # no passage is both member and non-member


def test_deterministic_and_seeded(lines):
    assert plan_audit(AUDIT, lines) == plan_audit(AUDIT, lines)
    other, _ = plan_audit(AuditConfig(**{**AUDIT.__dict__, "seed": 1}), lines)
    assert [c["secret"] for c in other["canaries"]] != [c["secret"] for c in plan_audit(AUDIT, lines)[0]["canaries"]]


def test_planted_rows_carry_hash_and_signature(lines):
    _, documents = plan_audit(AUDIT, lines)
    table = planted_table(documents, NearDedupConfig(num_perm=16, bands=4))
    assert table.num_rows == len(documents)
    assert table.column("doc_hash").to_pylist() == [content_hash(t) for _, _, t in documents]
    assert table.column("signature").type.list_size == 16
    assert "signature" not in planted_table(documents, None).column_names


def test_refuses_what_the_corpus_or_digits_cannot_supply(lines):
    with pytest.raises(AuditPlanError, match="passage_lines"):
        plan_audit(AUDIT, lines[:4])  # 24 orderings of 3 lines for 15 distinct passages: refused, not drawn
    with pytest.raises(AuditPlanError, match="passage_lines=1"):
        plan_audit(AuditConfig(enabled=True, passage_lines=1), lines[:40])  # 40 passages for 300: no endless draw
    with pytest.raises(AuditPlanError, match="canary_digits"):
        plan_audit(AuditConfig(enabled=True, canary_digits=1), lines)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"canary_template": "no placeholder"}, "exactly once"),
        ({"canary_template": "{secret} first"}, "text before"),
        ({"canary_template": "two\nlines {secret}"}, "one line"),
        ({"canary_repetitions": [0, 4]}, ">= 1"),
        ({"passage_repetitions": [2, 2]}, "distinct"),
    ],
)
def test_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AuditConfig(**kwargs)
