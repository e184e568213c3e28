"""`raylm interpret`: one prompt through a checkpoint's GPT, looked at from inside, each view checked.

    attention maps     every layer's and head's weights, from the explicit attention path
                       (``GPT.set_explicit_attention``), whose outputs are compared with SDPA's
    logit lens         each layer's residual stream through the final norm and the head: the top
                       tokens per position; the last layer's must equal the model's logits
    attributions       integrated gradients on the token embeddings (baseline: the mean token
                       embedding at every position; midpoint rule)
                       for the model's top next token; completeness error |sum - (F(x) - F(0))|
    linear probes      per layer, a logistic probe for a label the corpus has (First Folio vs modern
                       spelling of the same plays) against a control task with the same outputs
                       assigned at random per token type (Hewitt & Liang 2019); selectivity = the gap

``interpret`` returns everything as plain JSON-able data; ``orchestration.report.interpret`` renders it.
"""

from __future__ import annotations

import zlib
from typing import Optional

import numpy as np
import torch

from model.gpt import GPT
from orchestration.evaluate.data_source import EvalError

PROBE_LABELS = ("modern", "folio")


def _top_k(logits: torch.Tensor, k: int) -> list[list[tuple[int, float]]]:
    """(T, V) logits -> per position the k most likely token ids with their probabilities."""
    probs = torch.softmax(logits.float(), dim=-1)
    values, ids = probs.topk(k, dim=-1)
    return [[(int(i), float(v)) for i, v in zip(row_ids, row_values)] for row_ids, row_values in zip(ids, values)]


@torch.no_grad()
def attention_maps(model: GPT, idx: torch.Tensor) -> tuple[list[np.ndarray], float, float]:
    """(per layer (heads, T, T) weights, max |explicit - SDPA| over every layer's attention output,
    max |explicit - SDPA| over the logits)."""
    outputs: dict[bool, list[torch.Tensor]] = {False: [], True: []}
    logits = {}
    for explicit in (False, True):
        model.set_explicit_attention(explicit)
        hooks = [
            block.attn.register_forward_hook(lambda m, a, out, key=explicit: outputs[key].append(out))
            for block in model.transformer.h
        ]
        try:
            logits[explicit] = model(idx)[0]
        finally:
            for hook in hooks:
                hook.remove()
    maps = [block.attn.attention[0].float().cpu().numpy() for block in model.transformer.h]
    model.set_explicit_attention(False)
    layer_diff = max(float((a - b).abs().max()) for a, b in zip(outputs[True], outputs[False]))
    return maps, layer_diff, float((logits[True] - logits[False]).abs().max())


@torch.no_grad()
def logit_lens(model: GPT, idx: torch.Tensor, k: int) -> tuple[list[list[list[tuple[int, float]]]], float]:
    """(per layer, embeddings first: per position the top-k (token, prob) of that layer's residual
    read through ln_f and the head; max |last layer's lens logits - the model's logits|)."""
    stream = model.residual_stream(idx)
    lens = [model.lm_head(model.transformer.ln_f(x))[0] for x in stream]
    return [_top_k(logits, k) for logits in lens], float((lens[-1] - model(idx)[0][0]).abs().max())


def integrated_gradients(model: GPT, idx: torch.Tensor, steps: int) -> dict:
    """Attribution of each prompt token to the log-probability of the model's top next token."""
    with torch.no_grad():
        target = int(model(idx)[0][0, -1].argmax())
        x = model.transformer.wte(idx).detach()
        # the mean token embedding, not zeros: with no additive positions (RoPE) a zero residual is where
        # the first norm is undefined, and F jumps there (every norm is scale-invariant along the path)
        baseline = model.transformer.wte.weight[: model.cfg.vocab_size].mean(0).expand_as(x).clone()

    def log_prob(emb: torch.Tensor) -> torch.Tensor:
        hidden = model.transformer.ln_f(model.residual_stream(idx.expand(emb.size(0), -1), emb)[-1][:, -1])
        return torch.log_softmax(model.lm_head(hidden).float(), dim=-1)[:, target]

    alphas = (torch.arange(steps, dtype=x.dtype, device=x.device) + 0.5) / steps  # midpoint rule on [0, 1]
    path = (baseline + alphas[:, None, None] * (x - baseline)[0]).requires_grad_(True)
    (grads,) = torch.autograd.grad(log_prob(path).sum(), path)
    attributions = ((x - baseline)[0] * grads.mean(dim=0)).sum(dim=-1)
    with torch.no_grad():
        f_x, f_0 = float(log_prob(x)[0]), float(log_prob(baseline)[:1][0])
    return {
        "target_token": target,
        "steps": steps,
        "attributions": [float(a) for a in attributions],
        "log_prob_input": f_x,
        "log_prob_baseline": f_0,
        "completeness_error": abs(float(attributions.sum()) - (f_x - f_0)),
    }


def _fit_probe(features: np.ndarray, labels: np.ndarray, classes: int, seed: int) -> torch.nn.Linear:
    torch.manual_seed(seed)
    probe = torch.nn.Linear(features.shape[1], classes)
    opt = torch.optim.LBFGS(probe.parameters(), lr=1.0, max_iter=200, line_search_fn="strong_wolfe")
    x, y = torch.from_numpy(features), torch.from_numpy(labels)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(probe(x), y) + 1e-3 * probe.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return probe


@torch.no_grad()
def linear_probes(model: GPT, windows: dict[str, list[np.ndarray]], seed: int) -> dict:
    """Token-level probes for the window's label (``windows``: label -> token windows) at every layer,
    and the control task: each token type's label drawn at random once (same label set and balance
    of outputs), so only memorising types helps. Windows split 3:1 into fit and held-out."""
    labels = sorted(windows)
    rows, y = [], []
    for c, label in enumerate(labels):
        rows += windows[label]
        y += [c] * len(windows[label])
    order = np.random.default_rng(seed).permutation(len(rows))
    fit = np.zeros(len(rows), dtype=bool)
    fit[order[: 3 * len(rows) // 4]] = True
    tokens = torch.from_numpy(np.stack(rows)).long()
    stream = [x.cpu() for x in model.residual_stream(tokens.to(next(model.parameters()).device))]
    token_label = np.repeat(np.array(y), tokens.size(1))
    control_of_type = np.array(
        [zlib.crc32(f"{seed}:{t}".encode()) % len(labels) for t in range(model.cfg.padded_vocab_size)]
    )
    control_label = control_of_type[tokens.reshape(-1).numpy()]
    fit_positions = np.repeat(fit, tokens.size(1))
    out = []
    for layer, x in enumerate(stream):
        feats = x.reshape(-1, x.size(-1)).float().numpy()
        feats = (feats - feats[fit_positions].mean(0)) / (feats[fit_positions].std(0) + 1e-6)
        accuracy = {}
        for task, target in (("label", token_label), ("control", control_label)):
            probe = _fit_probe(feats[fit_positions], target[fit_positions], len(labels), seed)
            guess = probe(torch.from_numpy(feats[~fit_positions])).argmax(-1).numpy()
            accuracy[task] = float((guess == target[~fit_positions]).mean())
        out.append(
            {
                "layer": layer,
                "accuracy": accuracy["label"],
                "control_accuracy": accuracy["control"],
                "selectivity": accuracy["label"] - accuracy["control"],
            }
        )
    return {
        "labels": labels,
        "windows": {label: len(windows[label]) for label in labels},
        "window_tokens": int(tokens.size(1)),
        "held_out_windows": int((~fit).sum()),
        "layers": out,
    }


def folio_windows(enc, window: int, per_label: int, seed: int) -> dict[str, list[np.ndarray]]:
    """Token windows of the embedded plays that have both editions: First Folio spelling
    (``*_gut_f.txt``) and modern spelling (``*_gut.txt``), cleaned as prepare cleans them."""
    from data_pipeline.clean import clean_text, decode_utf8
    from data_pipeline.config import CleanConfig
    from data_pipeline.storage import embedded_corpus_dir

    corpus = embedded_corpus_dir()
    plays = sorted(p.name[: -len("_gut_f.txt")] for p in corpus.glob("*_gut_f.txt"))
    plays = [p for p in plays if (corpus / f"{p}_gut.txt").exists()]
    rng = np.random.default_rng(seed)
    out = {}
    for label, suffix in zip(PROBE_LABELS, ("_gut.txt", "_gut_f.txt")):
        pool = []
        for play in plays:
            text, _ = clean_text(decode_utf8((corpus / f"{play}{suffix}").read_bytes())[0], CleanConfig())
            ids = np.asarray(enc.encode_ordinary(text))
            starts = rng.choice(len(ids) - window, size=max(1, per_label // len(plays) + 1), replace=False)
            pool += [ids[s : s + window] for s in starts]
        out[label] = [pool[i] for i in rng.permutation(len(pool))[:per_label]]
    return out


def interpret(
    model: GPT,
    enc,
    prompt: str,
    *,
    top_k: int = 5,
    ig_steps: int = 64,
    probe_windows: Optional[dict[str, list[np.ndarray]]] = None,
    seed: int = 0,
) -> dict:
    """Every view of ``prompt`` (see the module map) as JSON-able data."""
    if not isinstance(model, GPT):
        raise EvalError(f"raylm interpret looks inside GPT checkpoints; this one is a {type(model).__name__}")
    ids = enc.encode_ordinary(prompt)
    if not ids:
        raise EvalError("the prompt encodes to no tokens; give a non-empty --prompt")
    if len(ids) > model.cfg.block_size:
        raise EvalError(f"the prompt is {len(ids)} tokens, longer than the model's block_size {model.cfg.block_size}")
    model.eval()
    idx = torch.tensor([ids], device=next(model.parameters()).device)
    maps, attn_diff, logits_diff = attention_maps(model, idx)
    lens, lens_diff = logit_lens(model, idx, top_k)
    out = {
        "prompt": prompt,
        "tokens": [enc.decode([t]) for t in ids],
        "token_ids": ids,
        "attention_explicit_vs_sdpa_max_abs_diff": attn_diff,
        "logits_explicit_vs_sdpa_max_abs_diff": logits_diff,
        "logit_lens_last_layer_max_abs_diff": lens_diff,
        "attention": [m.tolist() for m in maps],
        "logit_lens": [
            [[{"token": enc.decode([t]), "id": t, "prob": p} for t, p in position] for position in layer]
            for layer in lens
        ],
        "integrated_gradients": integrated_gradients(model, idx, ig_steps),
    }
    out["integrated_gradients"]["target_text"] = enc.decode([out["integrated_gradients"]["target_token"]])
    if probe_windows is not None:
        out["probes"] = linear_probes(model, probe_windows, seed)
    return out


def run_interpret(
    checkpoint: str,
    prompt: str,
    out: str,
    *,
    top_k: int = 5,
    ig_steps: int = 64,
    probe: str = "folio",
    probe_windows: int = 96,
    endpoint_url: Optional[str] = None,
    device: str = "cpu",
    seed: int = 0,
) -> dict:
    """Load ``checkpoint``, interpret ``prompt``, write ``<out>/interpret.json`` and ``<out>/index.html``;
    returns the result with the files' paths."""
    import json
    from pathlib import Path

    from orchestration.evaluate.load import load_checkpoint_model
    from orchestration.report.interpret import interpret_sections
    from orchestration.report.render import html_page, png

    model, cfg, enc, meta = load_checkpoint_model(checkpoint, endpoint_url=endpoint_url, device=device)
    windows = None
    if probe == "folio":
        windows = folio_windows(enc, min(64, cfg.block_size), probe_windows // 2, seed)
    result = interpret(model, enc, prompt, top_k=top_k, ig_steps=ig_steps, probe_windows=windows, seed=seed)
    result["checkpoint"] = meta["checkpoint_uri"]
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    (root / "interpret.json").write_text(json.dumps(result) + "\n")
    sections, figures = interpret_sections(result, meta["checkpoint_uri"])
    pngs = {name: png(fig) for name, fig in figures.items()}
    (root / "index.html").write_text(html_page(f"raylm interpret: {prompt!r}", sections, pngs))
    return {**result, "files": [str(root / "interpret.json"), str(root / "index.html")]}
