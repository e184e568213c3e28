"""The Ray Data dedup finds exactly the documents the old driver loop dropped (planted exact and near
duplicates, a chain that needs more than one resolution round), whatever the row order."""

from __future__ import annotations

import hashlib
import random
from collections import defaultdict

import numpy as np
import pyarrow as pa
import pytest
import ray

from data_pipeline.clean import minhash_signature
from data_pipeline.config import NearDedupConfig
from data_pipeline.dedup import mark_duplicates

pytestmark = pytest.mark.usefixtures("sort_based_shuffle")


NEAR = NearDedupConfig(num_perm=128, bands=32, threshold=0.7)


def reference_selection(keys, hashes, signatures, exact, near) -> dict[str, str]:
    """The driver loop `prepare` used before dedup moved into Ray Data (kept verbatim as the oracle):
    documents in (hash, key) order; drop one whose hash was seen (exact) or that shares an LSH bucket
    with a kept document agreeing on >= threshold of the signature (near)."""
    order = sorted(range(len(keys)), key=lambda i: (hashes[i], keys[i]))
    drop: dict[str, str] = {}
    seen_hashes: set[str] = set()
    buckets: dict[tuple[int, bytes], list[int]] = defaultdict(list)
    rows = near.num_perm // near.bands if near else 0
    for i in order:
        if exact and hashes[i] in seen_hashes:
            drop[keys[i]] = "exact_duplicate"
            continue
        seen_hashes.add(hashes[i])
        if near is None:
            continue
        sig = signatures[i]
        band_keys = [(b, sig[b * rows : (b + 1) * rows].tobytes()) for b in range(near.bands)]
        candidates = {j for bk in band_keys for j in buckets.get(bk, ())}
        if any(np.mean(signatures[j] == sig) >= near.threshold for j in candidates):
            drop[keys[i]] = "near_duplicate"
            continue
        for bk in band_keys:
            buckets[bk].append(i)
    return drop


def planted_corpus() -> dict[str, str]:
    """40 distinct documents, then planted copies: exact copies, light edits (near duplicates), and a
    chain base -> edit1 -> edit2 where edit2 is near edit1 but further from base."""
    rng = random.Random(7)
    vocab = [f"w{i}" for i in range(3000)]
    base = [" ".join(rng.choices(vocab, k=300)) for _ in range(40)]
    docs = {f"doc{i:02d}.txt#0": t for i, t in enumerate(base)}

    def edit(text: str, n: int, seed: int) -> str:
        words, r = text.split(), random.Random(seed)
        for pos in r.sample(range(len(words)), n):
            words[pos] = f"x{r.randrange(10**6)}"
        return " ".join(words)

    docs["copy_a.txt#0"] = base[0]
    docs["copy_b.txt#0"] = base[0]
    docs["copy_c.txt#3"] = base[5]
    for i in range(6):
        docs[f"near{i}.txt#0"] = edit(base[10 + i], 3, i)
    docs["near_copy.txt#0"] = docs["near0.txt#0"]  # an exact copy of a near duplicate
    step1 = edit(base[20], 9, 100)
    docs["chain1.txt#0"] = step1
    docs["chain2.txt#0"] = edit(step1, 9, 101)
    return docs


def run_ray_dedup(docs: dict[str, str], exact: bool, near, order: list[str]) -> tuple[dict[str, str], int]:
    rows = []
    for key in order:
        source, index = key.rsplit("#", 1)
        text = docs[key]
        row = {
            "source": source,
            "doc_index": int(index),
            "doc_hash": hashlib.sha256(text.encode()).hexdigest(),
            "text": text,
            "bytes_out": len(text.encode()),
            "group": "",
        }
        rows.append(row)
    table = pa.Table.from_pylist(rows)
    if near:
        flat = np.concatenate([minhash_signature(docs[k], near) for k in order])
        table = table.append_column("signature", pa.FixedSizeListArray.from_arrays(pa.array(flat), near.num_perm))
    ds = ray.data.from_arrow([table.slice(i, 7) for i in range(0, table.num_rows, 7)])  # several blocks
    marked, rounds = mark_duplicates(ds, exact, near, num_partitions=2)
    out = marked.take_all()
    assert sorted(f"{r['source']}#{r['doc_index']}" for r in out) == sorted(docs)  # every row comes back once
    return {f"{r['source']}#{r['doc_index']}": r["dup_reason"] for r in out if r["dup_reason"]}, rounds


@pytest.mark.parametrize("exact,near", [(True, NEAR), (True, None)])
def test_ray_dedup_equals_the_driver_loop_on_planted_duplicates(ray_session, exact, near):
    docs = planted_corpus()
    keys = list(docs)
    hashes = [hashlib.sha256(docs[k].encode()).hexdigest() for k in keys]
    sigs = np.stack([minhash_signature(docs[k], NEAR) for k in keys])
    expected = reference_selection(keys, hashes, sigs, exact, near)
    shuffled = keys[:]
    random.Random(3).shuffle(shuffled)
    got, _ = run_ray_dedup(docs, exact, near, shuffled)
    assert got == expected
    copies = {"copy_a.txt#0", "copy_b.txt#0", "doc00.txt#0", "copy_c.txt#3", "doc05.txt#0"}
    copies |= {"near0.txt#0", "near_copy.txt#0"}
    if near is None:  # one of each set of identical texts stays
        assert set(got) < copies and len(got) == 4 and set(got.values()) == {"exact_duplicate"}
        return
    # the planted ones and only them: 4 extra copies, one of each light edit pair, one of the chain's first pair
    edit_pairs = [{f"near{i}.txt#0", f"doc{10 + i}.txt#0"} for i in range(6)] + [{"chain1.txt#0", "doc20.txt#0"}]
    assert len(got) == 11 and set(got) <= copies | set().union(*edit_pairs)
    assert all(len(pair & set(got)) == 1 for pair in edit_pairs)
    assert sum(r == "exact_duplicate" for r in got.values()) == (4 if exact else 0)


def test_a_chain_of_near_duplicates_resolves_like_the_sequential_loop(ray_session):
    """c0 ~ c1 ~ c2 ~ c3 (neighbours similar, two steps apart not), in hash order c3 < c2 < c1 < c0:
    the loop keeps c3, drops c2, keeps c1 (a dropped c2 drops nothing) and drops c0: two rounds."""
    rng = random.Random(14)
    words = [f"v{rng.randrange(10**6)}" for _ in range(400)]
    texts = {}
    for step in range(4):  # each step rewrites 40 more words
        w = words[:]
        for pos in range(step * 40):
            w[pos] = f"s{pos}"
        texts[f"c{step}.txt#0"] = " ".join(w)
    cfg = NearDedupConfig(num_perm=128, bands=32, threshold=0.72)
    keys = list(texts)
    hashes = [hashlib.sha256(texts[k].encode()).hexdigest() for k in keys]
    sigs = np.stack([minhash_signature(texts[k], cfg) for k in keys])
    sims = (sigs[:, None, :] == sigs[None, :, :]).mean(-1)
    assert all(sims[i, i + 1] >= 0.72 for i in range(3)) and all(sims[i, i + 2] < 0.72 for i in range(2))
    assert sorted(keys, key=lambda k: hashes[keys.index(k)]) == keys[::-1]
    expected = reference_selection(keys, hashes, sigs, True, cfg)
    assert expected == {"c2.txt#0": "near_duplicate", "c0.txt#0": "near_duplicate"}
    assert run_ray_dedup(texts, True, cfg, keys) == (expected, 2)
