"""PII redaction: recall on planted data in varied formats, the validators that keep look-alikes, and
false finds on the whole embedded Shakespeare corpus as prepare cleans it."""

from __future__ import annotations

from collections import Counter

import pytest

from data_pipeline.clean import clean_text, decode_utf8
from data_pipeline.config import CleanConfig, PiiConfig
from data_pipeline.pii import PII_TYPES, PLACEHOLDERS, find_pii, redact
from data_pipeline.storage import embedded_corpus_dir
from tests.pii_planted import planted_pii, planted_text


def test_recall_per_type_on_planted_data_is_at_least_099():
    """250 of each type (5 seeds of 250 in the closing note), set in sentences: spans found exactly."""
    text, spans = planted_text(planted_pii(250, seed=11), seed=11)
    found = {(s.start, s.end): s.kind for s in find_pii(text, PII_TYPES)}
    hits = Counter(kind for start, end, kind in spans if found.get((start, end)) == kind)
    total = Counter(kind for _, _, kind in spans)
    assert set(total) == set(PII_TYPES) and all(n == 250 for n in total.values())
    assert all(hits[k] / total[k] >= 0.99 for k in PII_TYPES), {k: hits[k] / total[k] for k in PII_TYPES}
    assert len(found) - sum(hits.values()) <= 2  # nothing else in the sentences around them


def test_placeholders_counts_and_look_alikes_left_alone():
    text = (
        "Mail JOHN.DOE@EXAMPLE.COM. Hosts 8.8.8.8 and 2606:4700:4700::1111; not 10.0.0.1, 127.0.0.1, "
        "192.0.2.7, 2001:db8::1 or 999.1.1.1. Card 4111-1111-1111-1111, not 4111 1111 1111 1112. "
        "SSN 123-45-6789, not 000-12-3456 or 666-12-3456. Call +44 20 7946 0000 or (650) 253-0000; "
        "Act 3, Scene 2, line 1599, the year 1623, 12.5.3 of the folio."
    )
    out, counts = redact(text, PII_TYPES)
    assert counts == {"email": 1, "ip": 2, "card": 1, "national_id": 1, "phone": 2}
    for kept in ("10.0.0.1", "127.0.0.1", "192.0.2.7", "2001:db8::1", "999.1.1.1", "4111 1111 1111 1112",
                 "000-12-3456", "666-12-3456", "line 1599, the year 1623, 12.5.3"):  # fmt: skip
        assert kept in out, kept
    assert out.count(PLACEHOLDERS["ip"]) == 2 and "[EMAIL]" in out and "[NATIONAL_ID]" in out
    # only the types asked for
    out, counts = redact(text, ["email"])
    assert counts == {"email": 1} and "8.8.8.8" in out and "4111-1111-1111-1111" in out


def test_numbers_late_in_a_long_document_full_of_other_digits_are_found():
    """phonenumbers' matcher stops after 65,535 digit runs that are not numbers unless told otherwise."""
    text = "\n".join(str(i) for i in range(66_000)) + "\nCall +1 650-253-0000 or mail a@example.com."
    assert [s.kind for s in find_pii(text, PII_TYPES)] == ["phone", "email"]


def test_config_checks_region_and_types():
    with pytest.raises(ValueError, match="phone_region 'XX' is not a region"):
        PiiConfig(enabled=True, phone_region="XX")
    with pytest.raises(ValueError, match="pii.types is empty"):
        PiiConfig(enabled=True, types=[])


def test_at_most_five_false_spans_over_the_embedded_shakespeare_corpus():
    """Every embedded text, cleaned as prepare cleans it by default (markup, NFC, whitespace, Gutenberg
    header and licence), scanned for every type: the plays hold no personal data."""
    false = []
    for path in sorted(embedded_corpus_dir().glob("*.txt")):
        text, _ = clean_text(decode_utf8(path.read_bytes())[0], CleanConfig())
        false += [(path.name, text[s.start : s.end], s.kind) for s in find_pii(text, PII_TYPES)]
    assert len(false) <= 5, false
