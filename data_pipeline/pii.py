"""Personal data found in text and replaced by typed placeholders, offline (no model downloads).

Each type is a candidate pattern plus a validator, so what is redacted is what the type really is:

    email        local@domain.tld in any case
    ip           IPv4 / IPv6 addresses that are globally routable (``ipaddress``: private, loopback,
                 link-local, reserved and documentation ranges are left alone)
    card         13-19 digit card numbers (spaces or dashes between groups) of a known issuer range
                 whose Luhn check digit is right
    phone        numbers ``phonenumbers`` (Google's libphonenumber metadata) finds and validates, in
                 international form anywhere and in national form for ``phone_region``
    national_id  US social security numbers written ddd-dd-dddd / ddd dd dddd, outside the never-issued
                 areas (000, 666, 9xx), groups (00) and serials (0000)

Overlapping finds go to the first type in that order (an email's digits are not a phone number).
``redact`` returns the new text and the count per type; ``clean.clean_batch`` runs it on every document
inside the Ray Data pipeline when ``data.clean.pii.enabled``.
"""

from __future__ import annotations

import bisect
import ipaddress
import re
from collections import Counter
from typing import Iterator, NamedTuple

import phonenumbers

PII_TYPES = ("email", "ip", "card", "national_id", "phone")
PLACEHOLDERS = {t: f"[{t.upper()}]" for t in PII_TYPES}

_EMAIL = re.compile(
    r"(?<![\w.%+-])[A-Za-z0-9][A-Za-z0-9._%+-]{0,63}@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+"
    r"[A-Za-z]{2,24}(?![\w-])"
)
_IPV4 = re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?!\w|\.\d)")
_IPV6 = re.compile(r"(?<![\w:.])[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,7}(?:(?<=:)(?:\d{1,3}\.){3}\d{1,3})?(?![\w:])")
_CARD = re.compile(r"(?<![\d+-])\d(?:[ -]?\d){12,18}(?![\d-]|[ -]\d)")  # "+49 1512 ...": a phone
_SSN = re.compile(r"(?<![\d-])(?!000|666|9\d\d)\d{3}([- ])(?!00)\d{2}\1(?!0000)\d{4}(?![\d-]|[ -]\d)")
# Issuer ranges (IIN prefixes) and lengths: Visa, Mastercard, Amex, Discover, Diners, JCB, UnionPay
_ISSUERS = (
    (re.compile(r"4"), (13, 16, 19)),
    (re.compile(r"5[1-5]|222[1-9]|22[3-9]\d|2[3-6]\d\d|27[01]\d|2720"), (16,)),
    (re.compile(r"3[47]"), (15,)),
    (re.compile(r"6011|65|64[4-9]"), (16, 17, 18, 19)),
    (re.compile(r"30[0-5]|36|38"), (14, 15, 16, 17, 18, 19)),
    (re.compile(r"35(2[89]|[3-8]\d)"), (16, 17, 18, 19)),
    (re.compile(r"62"), (16, 17, 18, 19)),
)


class Span(NamedTuple):
    start: int
    end: int
    kind: str


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def is_card_number(text: str) -> bool:
    digits = re.sub(r"[ -]", "", text)
    if not any(p.match(digits) and len(digits) in lengths for p, lengths in _ISSUERS):
        return False
    return luhn_ok(digits)


def _public_ip(text: str) -> bool:
    try:
        return ipaddress.ip_address(text).is_global
    except ValueError:
        return False


def _candidates(text: str, kind: str, phone_region: str) -> Iterator[Span]:
    if kind == "email":
        if "@" in text:
            yield from (Span(m.start(), m.end(), kind) for m in _EMAIL.finditer(text))
    elif kind == "ip":
        for pattern in (_IPV4, _IPV6) if ":" in text else (_IPV4,):
            yield from (Span(m.start(), m.end(), kind) for m in pattern.finditer(text) if _public_ip(m.group()))
    elif kind == "card":
        yield from (Span(m.start(), m.end(), kind) for m in _CARD.finditer(text) if is_card_number(m.group()))
    elif kind == "national_id":
        yield from (Span(m.start(), m.end(), kind) for m in _SSN.finditer(text))
    elif kind == "phone":
        # max_tries: the matcher's default gives up after 65,535 digit runs that are not numbers, which a
        # long document with line numbers or tables reaches before the numbers it holds
        matcher = phonenumbers.PhoneNumberMatcher(
            text, phone_region, leniency=phonenumbers.Leniency.VALID, max_tries=len(text) + 1
        )
        for m in matcher:
            start = m.start + 1 if m.raw_string.startswith("(") and ")" not in m.raw_string else m.start
            yield Span(start, m.end, kind)  # "(+44 20 ...)": the bracket that opens the aside is not the number


def find_pii(text: str, types: tuple[str, ...] | list[str] = PII_TYPES, phone_region: str = "US") -> list[Span]:
    """Non-overlapping spans of personal data in ``text``, in text order (see the module map for rules)."""
    taken: list[Span] = []  # sorted by start, non-overlapping
    for kind in PII_TYPES:
        if kind not in types:
            continue
        for span in _candidates(text, kind, phone_region):
            at = bisect.bisect_left(taken, span)
            if (at > 0 and taken[at - 1].end > span.start) or (at < len(taken) and taken[at].start < span.end):
                continue  # overlaps an earlier type's find
            taken.insert(at, span)
    return taken


def redact(text: str, types: tuple[str, ...] | list[str] = PII_TYPES, phone_region: str = "US") -> tuple[str, Counter]:
    """(``text`` with every span ``find_pii`` finds replaced by its type's placeholder, count per type)."""
    spans = find_pii(text, types, phone_region)
    if not spans:
        return text, Counter()
    parts, at = [], 0
    for span in spans:
        parts.append(text[at : span.start])
        parts.append(PLACEHOLDERS[span.kind])
        at = span.end
    parts.append(text[at:])
    return "".join(parts), Counter(span.kind for span in spans)
