"""Exact and near-duplicate removal inside Ray Data: the driver holds counts, never per-document data.

The decision equals a sequential pass over the documents in (content hash, source#index) order that
keeps a document unless an earlier kept one has the same hash (exact) or shares a MinHash LSH band
bucket with it and agrees on >= ``threshold`` of the signature positions (near). So which copy
survives depends only on the corpus and the config, never on how Ray ordered blocks. Stages:

1. band rows (band key, hash, signature) -> group by band key -> similar pairs (a, b), a < b: edges.
2. the sequential rule on the edge graph, in rounds: a node with no live in-edge (from an earlier
   undecided or kept document) is kept and drops the nodes it points to; edges touching a dropped node
   die. Each round is two group-bys by node; the rounds needed grow with the longest chain of
   near duplicates (usually one or two), not with the number of documents.
3. group by content hash (documents + near-duplicate marks): the first copy by source#index takes the
   hash's near decision, the others are exact duplicates (near duplicates when exact dedup is off).
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from data_pipeline.config import NearDedupConfig

DOC_COLUMNS = ("source", "doc_index", "doc_hash", "text", "bytes_out", "group")  # what survives dedup
_EDGE_SCHEMA = pa.schema([("node", pa.string()), ("other", pa.string()), ("role", pa.int8())])
OUT, IN, HIT, DEAD, DROPPED = range(5)  # edge row roles: node -> other, other -> node, marks


def _edge_rows(nodes: list[str], others: list[str], roles: list[int]) -> pa.Table:
    return pa.table(
        {
            "node": pa.array(nodes, pa.string()),
            "other": pa.array(others, pa.string()),
            "role": pa.array(roles, pa.int8()),
        },
        schema=_EDGE_SCHEMA,
    )


def band_rows(batch: pa.Table, *, near: NearDedupConfig) -> pa.Table:
    """(doc_hash, signature) -> one row per LSH band: (band_key, doc_hash, signature)."""
    rows_per_band = near.num_perm // near.bands
    sigs = batch.column("signature").combine_chunks().flatten().to_numpy().reshape(batch.num_rows, near.num_perm)
    hashes = batch.column("doc_hash").to_pylist()
    keys, index = [], []
    for b in range(near.bands):
        part = sigs[:, b * rows_per_band : (b + 1) * rows_per_band]
        keys += [f"{b}:{row.tobytes().hex()}" for row in part]
        index += range(len(hashes))
    take = pa.array(index, pa.int64())
    return pa.table(
        {
            "band_key": pa.array(keys, pa.string()),
            "doc_hash": pa.array(hashes, pa.string()).take(take),
            "signature": batch.column("signature").take(take),
        }
    )


def similar_pairs(group: pa.Table, *, threshold: float) -> pa.Table:
    """One band bucket -> edges (a OUT b, b IN a) for its hash pairs a < b with estimated Jaccard >= threshold."""
    hashes = group.column("doc_hash").to_pylist()
    first = sorted({h: i for i, h in reversed(list(enumerate(hashes)))}.items())  # exact copies are one node
    if len(first) < 2:
        return _edge_rows([], [], [])
    num_perm = group.schema.field("signature").type.list_size
    sigs = group.column("signature").combine_chunks().flatten().to_numpy().reshape(group.num_rows, num_perm)
    sigs = sigs[[i for _, i in first]]
    nodes, others, roles = [], [], []
    for i, (a, _) in enumerate(first[:-1]):
        agree = (sigs[i + 1 :] == sigs[i]).mean(axis=1)
        for j in np.nonzero(agree >= threshold)[0]:
            b = first[i + 1 + j][0]
            nodes += [a, b]
            others += [b, a]
            roles += [OUT, IN]
    return _edge_rows(nodes, others, roles)


def _live_edges(group: pa.Table) -> tuple[str, set[str], set[str], list[int]]:
    node = group.column("node")[0].as_py()
    roles = group.column("role").to_pylist()
    others = group.column("other").to_pylist()
    dead = {o for o, r in zip(others, roles) if r == DEAD}
    outs = {o for o, r in zip(others, roles) if r == OUT} - dead
    ins = {o for o, r in zip(others, roles) if r == IN} - dead
    return node, outs, ins, roles


def find_roots(group: pa.Table) -> pa.Table:
    """Round step 1, one node's rows: a node with no live in-edge is kept and hits what it points to;
    any other node keeps its live edges for step 2."""
    node, outs, ins, _ = _live_edges(group)
    if not ins:
        targets = sorted(outs)
        return _edge_rows(targets, [node] * len(targets), [HIT] * len(targets))
    return _edge_rows([node] * (len(outs) + len(ins)), sorted(outs) + sorted(ins), [OUT] * len(outs) + [IN] * len(ins))


def apply_hits(group: pa.Table) -> pa.Table:
    """Round step 2, one node's rows: a hit node is dropped and tells its neighbours their edge is dead."""
    node, outs, ins, roles = _live_edges(group)
    if HIT in roles:
        neighbours = sorted(outs | ins)
        return _edge_rows([node, *neighbours], ["", *[node] * len(neighbours)], [DROPPED, *[DEAD] * len(neighbours)])
    return _edge_rows([node] * (len(outs) + len(ins)), sorted(outs) + sorted(ins), [OUT] * len(outs) + [IN] * len(ins))


def with_roles(batch: pa.Table, *, roles: tuple[int, ...]) -> pa.Table:
    return batch.filter(pc.is_in(batch.column("role"), pa.array(roles, pa.int8())))


def _count_roles(edges: ray.data.Dataset, roles: tuple[int, ...]) -> int:
    return edges.map_batches(with_roles, batch_format="pyarrow", fn_kwargs={"roles": roles}).count()


def near_duplicate_hashes(
    docs: ray.data.Dataset, near: NearDedupConfig, num_partitions: int
) -> tuple[Optional[ray.data.Dataset], int]:
    """Content hashes the sequential rule drops as near duplicates (a dataset of DROPPED edge rows,
    ``node`` = hash; None when there are none) and the number of rounds it took."""
    edges = (
        docs.select_columns(["doc_hash", "signature"])
        .map_batches(band_rows, batch_format="pyarrow", fn_kwargs={"near": near})
        .groupby("band_key", num_partitions=num_partitions)
        .map_groups(similar_pairs, batch_format="pyarrow", fn_kwargs={"threshold": near.threshold})
        .materialize()
    )
    dropped, rounds = [], 0
    while _count_roles(edges, (OUT,)):  # DEAD notices alone need no round: they only cancel edges
        rounds += 1
        hits = edges.groupby("node", num_partitions=num_partitions).map_groups(find_roots, batch_format="pyarrow")
        out = hits.groupby("node", num_partitions=num_partitions).map_groups(apply_hits, batch_format="pyarrow")
        out = out.materialize()
        dropped.append(out.map_batches(with_roles, batch_format="pyarrow", fn_kwargs={"roles": (DROPPED,)}))
        edges = out.map_batches(with_roles, batch_format="pyarrow", fn_kwargs={"roles": (OUT, IN, DEAD)}).materialize()
    if not dropped:
        return None, 0
    return (dropped[0].union(*dropped[1:]) if len(dropped) > 1 else dropped[0]), rounds


def as_document_rows(batch: pa.Table) -> pa.Table:
    return batch.select(list(DOC_COLUMNS)).append_column("is_mark", pa.array([False] * batch.num_rows))


def as_mark_rows(batch: pa.Table) -> pa.Table:
    """DROPPED edge rows -> rows shaped like documents (empty text) that mark a hash as a near duplicate."""
    n = batch.num_rows
    return pa.table(
        {
            "source": pa.array([""] * n, pa.string()),
            "doc_index": pa.array([-1] * n, pa.int64()),
            "doc_hash": batch.column("node"),
            "text": pa.array([""] * n, pa.string()),
            "bytes_out": pa.array([0] * n, pa.int64()),
            "group": pa.array([""] * n, pa.string()),
            "is_mark": pa.array([True] * n),
        }
    )


def resolve_copies(group: pa.Table, *, exact: bool, near: bool) -> pa.Table:
    """All documents of one content hash (+ its near-duplicate mark): the first by source#index takes the
    hash's near decision; the others are exact duplicates of it (near duplicates when exact is off)."""
    marked = pc.any(group.column("is_mark")).as_py()
    docs = group.filter(pc.invert(group.column("is_mark"))).drop_columns(["is_mark"])
    keys = [f"{s}#{i}" for s, i in zip(docs.column("source").to_pylist(), docs.column("doc_index").to_pylist())]
    order = sorted(range(len(keys)), key=keys.__getitem__)
    copies = "exact_duplicate" if exact else "near_duplicate" if near else ""
    reasons = ["near_duplicate" if marked else ""] + [copies] * (len(order) - 1)
    return docs.take(pa.array(order, pa.int64())).append_column(
        "dup_reason", pa.array(reasons[: len(order)], pa.string())
    )


def mark_duplicates(
    docs: ray.data.Dataset, exact: bool, near: Optional[NearDedupConfig], num_partitions: int
) -> tuple[ray.data.Dataset, int]:
    """Documents that passed cleaning (``DOC_COLUMNS`` + ``signature`` when near is set) -> the same rows
    (``DOC_COLUMNS``) with ``dup_reason``: '' kept, 'exact_duplicate' or 'near_duplicate'; and the
    number of near-dedup rounds."""
    if not exact and near is None:
        return docs.map_batches(
            lambda b: b.select(list(DOC_COLUMNS)).append_column("dup_reason", pa.array([""] * b.num_rows, pa.string())),
            batch_format="pyarrow",
        ), 0
    marks, rounds = near_duplicate_hashes(docs, near, num_partitions) if near else (None, 0)
    rows = docs.map_batches(as_document_rows, batch_format="pyarrow")
    if marks is not None:
        rows = rows.union(marks.map_batches(as_mark_rows, batch_format="pyarrow"))
    resolved = rows.groupby("doc_hash", num_partitions=num_partitions).map_groups(
        resolve_copies, batch_format="pyarrow", fn_kwargs={"exact": exact, "near": near is not None}
    )
    return resolved, rounds
