"""An n-gram language model over token ids with interpolated modified Kneser-Ney smoothing.

The classical baseline a neural LM has to beat on the same tokens. Pure numpy: an n-gram
(t_1..t_k) is packed exactly into one int64 key sum(t_i * V^(k-i)), so counting is ``np.unique`` and
lookup is ``np.searchsorted`` over sorted keys; no Python loop runs per token.

Smoothing follows Chen & Goodman (1998), interpolated modified KN:

    P_k(w | h) = max(c_k(h, w) - D_k(c), 0) / c_k(h) + gamma_k(h) * P_{k-1}(w | h')
    gamma_k(h) = (D_k1 * N1(h .) + D_k2 * N2(h .) + D_k3+ * N3+(h .)) / c_k(h)

where h' drops h's oldest token, c_k are raw counts at the highest order and continuation counts
N1+(. h w) (distinct left neighbours) below it, and P_0 is uniform over the vocabulary, so every
context's distribution sums to 1 over all V tokens, unseen ones included. A context never seen at
order k passes P_{k-1} through unchanged. ``discount`` set to one number gives plain interpolated KN.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np

MIN_ORDER, MAX_ORDER = 1, 5
NGRAM_FILE, NGRAM_META_FILE = "ngram.npz", "ngram.json"
_INT64_MAX = np.iinfo(np.int64).max


@dataclass
class NGramMeta:
    n: int
    vocab_size: int
    discounts: list  # per order 1..n: [D1, D2, D3+]
    train_tokens: int
    format: str = "raylm-ngram/1"


def check_order(n: int, vocab_size: int) -> None:
    """Raise if n is outside [1, 5] or V^n does not fit the exact int64 key packing."""
    if not isinstance(n, (int, np.integer)) or not MIN_ORDER <= n <= MAX_ORDER:
        raise ValueError(f"n-gram order n must be an integer in [{MIN_ORDER}, {MAX_ORDER}], got {n!r}")
    if vocab_size < 2:
        raise ValueError(f"vocab_size must be >= 2, got {vocab_size}")
    if vocab_size**n > _INT64_MAX:
        raise ValueError(f"vocab_size {vocab_size} ** n {n} overflows the int64 n-gram keys; use a smaller n")


def _keys(tokens: np.ndarray, k: int, V: int) -> np.ndarray:
    """int64 keys of every k-gram in a 1-D token array (len(tokens) - k + 1 of them)."""
    m = len(tokens) - k + 1
    key = np.zeros(max(m, 0), dtype=np.int64)
    for i in range(k):
        key = key * V + tokens[i : i + m]
    return key


def _discounts(counts: np.ndarray, fixed: Optional[float]) -> list[float]:
    """[D1, D2, D3+] from count-of-counts (Chen & Goodman eq. 26); a fixed discount gives [D, D, D].

    Tiny corpora can lack some count-of-counts; then the missing ones fall back to 0.75-ish values
    clipped into (0, c], which keeps every distribution proper."""
    if fixed is not None:
        return [float(min(fixed, 1.0))] * 3
    n1, n2, n3, n4 = (int(np.count_nonzero(counts == c)) for c in (1, 2, 3, 4))
    if min(n1, n2, n3, n4) == 0:
        return [0.5, 1.0, 1.5]
    y = n1 / (n1 + 2 * n2)
    d = [1 - 2 * y * n2 / n1, 2 - 3 * y * n3 / n2, 3 - 4 * y * n4 / n3]
    return [float(np.clip(x, 0.05, c)) for x, c in zip(d, (1.0, 2.0, 3.0))]


class NGramLM:
    """Counts and discounts of an interpolated (modified) Kneser-Ney n-gram model.

    Per order k (1..n) it holds sorted n-gram keys with their (raw or continuation) counts, and
    sorted context keys with total count and N1/N2/N3+ (how many words follow that context once,
    twice, three or more times).
    """

    def __init__(self, n: int, vocab_size: int, tables: dict[str, np.ndarray], discounts: list, train_tokens: int):
        check_order(n, vocab_size)
        self.n, self.vocab_size, self.tables = n, vocab_size, tables
        self.discounts, self.train_tokens = [list(map(float, d)) for d in discounts], int(train_tokens)

    @classmethod
    def fit(cls, tokens: np.ndarray, n: int, vocab_size: int, *, discount: Optional[float] = None) -> "NGramLM":
        """Count a 1-D token stream (ids < vocab_size). discount None: modified KN with D1, D2, D3+
        estimated per order; a number in (0, 1]: plain interpolated KN with that single discount."""
        check_order(n, vocab_size)
        if discount is not None and not 0 < discount <= 1:
            raise ValueError(f"discount must be in (0, 1] (or None for modified KN), got {discount}")
        tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
        if len(tokens) < n:
            raise ValueError(f"need at least n={n} training tokens, got {len(tokens)}")
        if tokens.min() < 0 or tokens.max() >= vocab_size:
            raise ValueError(f"token ids must lie in [0, {vocab_size}), got [{tokens.min()}, {tokens.max()}]")
        V = vocab_size
        tables, discounts = {}, []
        keys, counts = np.unique(_keys(tokens, n, V), return_counts=True)  # highest order: raw counts
        for k in range(n, 0, -1):
            d = _discounts(counts, discount)
            ctx = keys // V
            ctx_keys, start = np.unique(ctx, return_index=True)  # keys sorted, so ctx sorted too
            tables.update(
                {
                    f"keys{k}": keys,
                    f"counts{k}": counts.astype(np.int32),
                    f"ctx{k}": ctx_keys,
                    f"total{k}": np.add.reduceat(counts, start).astype(np.int64),
                }
            )
            for name, hit in (("n1", counts == 1), ("n2", counts == 2), ("n3", counts >= 3)):
                tables[f"{name}_{k}"] = np.add.reduceat(hit.astype(np.int32), start)
            discounts.append(d)
            # Order k-1 counts continuations: how many distinct tokens precede each (k-1)-gram
            keys, counts = np.unique(keys % V ** (k - 1), return_counts=True)
        return cls(n, V, tables, discounts[::-1], len(tokens))

    def log_probs(
        self, history: np.ndarray, targets: np.ndarray, history_len: Optional[np.ndarray] = None
    ) -> np.ndarray:
        """Natural-log P(target | history) for M queries.

        history: int [M, n - 1], the most recent token last; history_len: int [M], how many of the
        rightmost history tokens are real (a window's first positions have fewer; None: all).
        Shorter histories use the lower orders only."""
        targets = np.asarray(targets, dtype=np.int64)
        M, V = len(targets), self.vocab_size
        history = np.asarray(history, dtype=np.int64).reshape(M, self.n - 1)
        hlen = np.full(M, self.n - 1) if history_len is None else np.asarray(history_len)
        p = np.full(M, 1.0 / V)
        ctx = np.zeros(M, dtype=np.int64)  # key of the last (k - 1) history tokens
        for k in range(1, self.n + 1):
            if k > 1:
                ctx = ctx + history[:, self.n - k] * V ** (k - 2)  # prepend the next older token
            usable = hlen >= k - 1
            t = self.tables
            ci = np.searchsorted(t[f"ctx{k}"], ctx)
            ci_c = np.minimum(ci, len(t[f"ctx{k}"]) - 1)
            seen = usable & (t[f"ctx{k}"][ci_c] == ctx)
            total = t[f"total{k}"][ci_c].astype(np.float64)
            d1, d2, d3 = self.discounts[k - 1]
            gamma_num = d1 * t[f"n1_{k}"][ci_c] + d2 * t[f"n2_{k}"][ci_c] + d3 * t[f"n3_{k}"][ci_c]
            key = ctx * V + targets
            ki = np.minimum(np.searchsorted(t[f"keys{k}"], key), len(t[f"keys{k}"]) - 1)
            c = np.where(t[f"keys{k}"][ki] == key, t[f"counts{k}"][ki], 0).astype(np.float64)
            d = np.where(c >= 3, d3, np.where(c == 2, d2, d1))
            pk = (np.maximum(c - d, 0.0) + gamma_num * p) / np.maximum(total, 1.0)
            p = np.where(seen, pk, p)
        return np.log(p)

    def next_token_probs(self, context: list[int] | np.ndarray) -> np.ndarray:
        """P(w | context) for every w in the vocabulary (float64 [V]); uses the last n - 1 tokens."""
        context = np.asarray(context, dtype=np.int64)[-(self.n - 1) :] if self.n > 1 else np.zeros(0, np.int64)
        hist = np.zeros(self.n - 1, dtype=np.int64)
        if len(context):
            hist[-len(context) :] = context
        V = self.vocab_size
        return np.exp(self.log_probs(np.tile(hist, (V, 1)), np.arange(V), np.full(V, len(context))))

    def window_nll(self, windows: np.ndarray) -> np.ndarray:
        """NLL (nats) of targets windows[:, 1:] given the tokens before them in the same window
        [N, T + 1] -> [N, T]; the context never reaches outside the window, as for a transformer."""
        windows = np.asarray(windows, dtype=np.int64)
        N, T1 = windows.shape
        T = T1 - 1
        h = self.n - 1
        padded = np.concatenate([np.zeros((N, h), np.int64), windows], axis=1)
        # history for target j (1..T) is padded[:, j : j + h], i.e. windows[:, j - h : j]
        idx = np.arange(1, T + 1)[:, None] + np.arange(h)[None, :]
        history = padded[:, idx].reshape(N * T, h)
        hlen = np.minimum(np.arange(1, T + 1), h)
        lp = self.log_probs(history, windows[:, 1:].reshape(-1), np.tile(hlen, N))
        return -lp.reshape(N, T)

    def save(self, out_dir: str | Path) -> Path:
        """Write ngram.npz (count tables) and ngram.json (order, vocab, discounts) into out_dir."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        np.savez(out / NGRAM_FILE, **self.tables)
        meta = NGramMeta(n=self.n, vocab_size=self.vocab_size, discounts=self.discounts, train_tokens=self.train_tokens)
        (out / NGRAM_META_FILE).write_text(json.dumps(asdict(meta), indent=2) + "\n")
        return out

    @classmethod
    def load(cls, model_dir: str | Path) -> "NGramLM":
        d = Path(model_dir)
        if not (d / NGRAM_META_FILE).exists() or not (d / NGRAM_FILE).exists():
            raise FileNotFoundError(
                f"{d}: no n-gram model ({NGRAM_META_FILE} + {NGRAM_FILE}); train one with baselines.train_ngram"
            )
        meta = json.loads((d / NGRAM_META_FILE).read_text())
        with np.load(d / NGRAM_FILE) as z:
            tables = {k: z[k] for k in z.files}
        return cls(meta["n"], meta["vocab_size"], tables, meta["discounts"], meta["train_tokens"])
