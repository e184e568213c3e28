"""Planted personal data in varied real-world formats, for the redaction recall test and bench_pii.

``planted_pii(n, seed)`` -> {type: [surface strings]}: n of each type, drawn so each is what its type
says (public addresses, issuer-range card numbers with a right Luhn digit, numbers libphonenumber
validates, issuable SSNs); ``planted_text`` sets them in sentences and returns where each one lies.
"""

from __future__ import annotations

import ipaddress
import random

import phonenumbers

from data_pipeline.pii import luhn_ok

_NAMES = ["john", "mary", "o.brien", "li_wei", "anne-marie", "j.smith", "x", "hamlet", "ophelia99", "k.o"]
_DOMAINS = ["example.com", "mail.co.uk", "uni-heidelberg.de", "corp.io", "stage.globe-theatre.org", "gmail.com"]
_CARD_ISSUERS = [("4", 16), ("4", 13), ("51", 16), ("55", 16), ("2221", 16), ("2720", 16), ("34", 15), ("37", 15),
                 ("6011", 16), ("65", 16), ("36", 14), ("3530", 16), ("62", 16), ("4", 19)]  # fmt: skip
_PHONE_REGIONS = ["US", "US", "US", "GB", "DE", "FR", "IN", "AU", "JP", "BR"]
_CONTEXTS = [
    "Write to me at {} ere the morrow.",
    "My lord, the number is {}, and no other.",
    "({}) quoth the herald.",
    "Send word: {}; the rest is silence.",
    "{} - so says the letter.",
    "Call upon {}.",
]


def _email(rng: random.Random) -> str:
    local = rng.choice(_NAMES) + rng.choice(["", str(rng.randrange(100)), "+news", ".x"])
    domain = rng.choice(_DOMAINS)
    address = f"{local}@{domain}"
    return rng.choice([address, address.upper(), address.title()])


def _ip(rng: random.Random) -> str:
    while True:
        if rng.random() < 0.5:
            ip = ipaddress.IPv4Address(rng.getrandbits(32))
            text = str(ip)
        else:
            ip = ipaddress.IPv6Address((0x2 << 124) | rng.getrandbits(124))  # 2000::/3, global unicast
            text = rng.choice([str(ip), ip.exploded, ip.compressed.upper()])
        if ip.is_global:
            return text


def _card(rng: random.Random) -> str:
    prefix, length = rng.choice(_CARD_ISSUERS)
    body = prefix + "".join(str(rng.randrange(10)) for _ in range(length - len(prefix) - 1))
    digits = next(body + str(d) for d in range(10) if luhn_ok(body + str(d)))
    if length == 15:
        groups = [digits[:4], digits[4:10], digits[10:]]
    else:
        groups = [digits[i : i + 4] for i in range(0, length, 4)]
    return rng.choice([digits, " ".join(groups), "-".join(groups)])


def _phone(rng: random.Random) -> str:
    region = rng.choice(_PHONE_REGIONS)
    while True:
        example = phonenumbers.example_number_for_type(region, rng.choice([0, 1]))  # fixed line or mobile
        national = str(example.national_number)
        digits = national[: max(3, len(national) // 2)] + "".join(
            str(rng.randrange(10)) for _ in range(len(national) - max(3, len(national) // 2))
        )
        number = phonenumbers.parse(f"+{example.country_code}{digits}")
        if phonenumbers.is_valid_number(number):
            break
    styles = [phonenumbers.PhoneNumberFormat.INTERNATIONAL, phonenumbers.PhoneNumberFormat.E164]
    if region == "US":
        styles.append(phonenumbers.PhoneNumberFormat.NATIONAL)  # (650) 253-0000
        national = phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.NATIONAL)
        dotted = national.replace("(", "").replace(") ", ".").replace("-", ".")
        if rng.random() < 0.3:
            return rng.choice([dotted, dotted.replace(".", "-")])
    return phonenumbers.format_number(number, rng.choice(styles))


def _ssn(rng: random.Random) -> str:
    area = rng.choice([a for a in range(1, 900) if a != 666])
    sep = rng.choice(["-", " "])
    return f"{area:03d}{sep}{rng.randrange(1, 100):02d}{sep}{rng.randrange(1, 10000):04d}"


MAKERS = {"email": _email, "ip": _ip, "card": _card, "phone": _phone, "national_id": _ssn}


def planted_pii(n: int, seed: int = 0) -> dict[str, list[str]]:
    rng = random.Random(seed)
    return {kind: [make(rng) for _ in range(n)] for kind, make in MAKERS.items()}


def planted_text(pii: dict[str, list[str]], seed: int = 0) -> tuple[str, list[tuple[int, int, str]]]:
    """(text, [(start, end, type)]): every item in a sentence of its own, in shuffled order."""
    rng = random.Random(seed)
    items = [(kind, s) for kind, values in pii.items() for s in values]
    rng.shuffle(items)
    parts, spans, at = [], [], 0
    for kind, surface in items:
        sentence = rng.choice(_CONTEXTS)
        before = sentence.index("{}")
        spans.append((at + before, at + before + len(surface), kind))
        line = sentence.format(surface) + "\n"
        parts.append(line)
        at += len(line)
    return "".join(parts), spans
