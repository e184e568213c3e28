"""Exact and near-duplicate selection over (key, content hash, MinHash signature) triples.

Runs on the driver over hashes and signatures only (32 bytes + 4*num_perm per document), never texts.
Documents are visited in content-hash order, so which copy survives does not depend on how Ray
ordered blocks: the result is a pure function of the corpus and the config.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Optional

import numpy as np

from data_pipeline.config import NearDedupConfig


def select_duplicates(
    keys: list[str], hashes: list[str], signatures: Optional[np.ndarray], exact: bool, near: Optional[NearDedupConfig]
) -> dict[str, str]:
    """Returns {key: 'exact_duplicate' | 'near_duplicate'} for the documents to drop.

    keys: unique document ids (source#index); hashes: sha256 of cleaned text; signatures: uint32
    [n, num_perm] or None. A near duplicate shares an LSH band bucket with an already-kept document
    and their signatures agree on >= ``near.threshold`` of positions (estimated Jaccard).
    """
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
