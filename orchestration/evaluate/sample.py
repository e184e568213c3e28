"""Sampling text from a checkpoint (``raylm generate``, the demo's closing sample)."""

from __future__ import annotations

from typing import Optional

from orchestration.evaluate.load import load_checkpoint_model


def generate_text(
    checkpoint_uri: str,
    prompt: str,
    max_new_tokens: int = 200,
    *,
    temperature: float = 0.8,
    top_k: Optional[int] = 50,
    top_p: Optional[float] = None,
    seed: Optional[int] = None,
    endpoint_url: Optional[str] = None,
    device: str = "cpu",
) -> str:
    """The prompt's continuation (new text only) sampled from a checkpoint; stops at end-of-text."""
    from data_pipeline.tokenizer import EOT
    from model.generate import generate

    model, _, enc, _ = load_checkpoint_model(checkpoint_uri, endpoint_url=endpoint_url, device=device)
    eot = enc.encode_single_token(EOT)
    ids = enc.encode(prompt, allowed_special="all") or [eot]  # an empty prompt starts a new document
    new = generate(
        model, [ids], max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, eos_id=eot, seed=seed
    )[0]
    return enc.decode([t for t in new if t != eot])
