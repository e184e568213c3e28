"""Document masking (``model.document_masking``): a document of a packed row is computed as if it started
the row, in training forwards, in KV-cache generation and in evaluation; off, the forward is the plain
causal one. CPU, tiny configs, in-process (no Ray), a few seconds."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_cached_decoding_matches_full

from model.config import ModelConfig
from model.generate import generate
from model.gpt import GPT
from orchestration.config import ConfigError, PretrainConfig, load_config
from orchestration.deploy.hf import hf_family, unsupported_reason

EOS = 63
POSITIONS = ("learned", "sinusoidal", "rope")


def tiny(**overrides) -> ModelConfig:
    # init_std 0.1 spreads the logits so greedy picks are decisive, not float-noise ties
    base = dict(vocab_size=64, block_size=32, n_layer=2, n_head=4, n_embd=32, init_std=0.1, eos_id=EOS)
    return ModelConfig(**{**base, "document_masking": True, **overrides})


def build(cfg: ModelConfig, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(cfg).eval()


def unmasked_twin(model: GPT) -> GPT:
    """The same weights with document_masking off."""
    twin = GPT(dataclasses.replace(model.cfg, document_masking=False)).eval()
    twin.load_state_dict(model.state_dict())
    return twin


def text(n: int, seed: int) -> torch.Tensor:
    """(1, n) token ids that are never the end-of-text token."""
    return torch.randint(0, EOS, (1, n), generator=torch.Generator().manual_seed(seed))


def row(*docs: torch.Tensor) -> torch.Tensor:
    """Documents packed into one row, each ended by EOS except the last (cut by the window)."""
    eos = torch.tensor([[EOS]])
    parts = [p for doc in docs[:-1] for p in (doc, eos)] + [docs[-1]]
    return torch.cat(parts, dim=1)


@pytest.mark.parametrize("pos_encoding", POSITIONS)
def test_a_document_reads_the_same_whatever_shares_its_row(pos_encoding):
    model = build(tiny(pos_encoding=pos_encoding))
    doc2 = text(9, seed=2)
    with torch.no_grad():
        alone, _ = model(doc2)  # document 2 at the start of a row
        packed = [model(row(text(n, seed), doc2))[0] for n, seed in ((6, 1), (11, 3))]
        # document 1 changes (text and length): document 2's logits do not, and equal those of it alone
        for logits in packed:
            torch.testing.assert_close(logits[:, -9:], alone, rtol=0, atol=1e-5)
        # three documents: the third is computed alone too, the first as a plain causal forward
        three = row(text(5, seed=4), text(4, seed=5), doc2)
        torch.testing.assert_close(model(three)[0][:, -9:], alone, rtol=0, atol=1e-5)
        torch.testing.assert_close(model(three)[0][:, :6], unmasked_twin(model)(three)[0][:, :6], rtol=0, atol=1e-6)
        # without masking document 2 does read document 1: the invariance above is the mask's doing
        unmasked = unmasked_twin(model)(row(text(6, seed=1), doc2))[0]
        assert (unmasked[:, -9:] - alone).abs().amax() > 1e-2


def test_the_end_of_text_token_belongs_to_the_document_it_ends():
    model = build(tiny(pos_encoding="rope"))
    doc1, doc2 = text(6, seed=1), text(5, seed=2)
    with torch.no_grad():
        packed, _ = model(row(doc1, doc2))
        ended, _ = model(torch.cat([doc1, torch.tensor([[EOS]])], dim=1))
    # the EOS position predicts the next document's first token from document 1 (its own), not from itself
    torch.testing.assert_close(packed[:, :7], ended, rtol=0, atol=1e-6)


def test_the_loss_of_a_packed_row_is_the_loss_of_its_documents():
    model = build(tiny(pos_encoding="learned"))
    doc1, doc2 = text(10, seed=1), text(12, seed=2)
    packed = row(doc1, doc2)
    inputs, targets = packed[:, :-1], packed[:, 1:]
    with torch.no_grad():
        _, loss = model(inputs, targets)
        logits, _ = model(inputs)
        by_hand = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        _, unmasked_loss = unmasked_twin(model)(inputs, targets)
    torch.testing.assert_close(loss, by_hand, rtol=1e-5, atol=1e-6)  # the fused loss sees the same forward
    assert abs(loss.item() - unmasked_loss.item()) > 1e-4


def test_masking_off_is_the_fused_causal_forward(monkeypatch):
    """Off (the default), a forward hands SDPA no mask and is_causal=True, even where rows hold EOS tokens."""
    calls = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, **kwargs):
        calls.append((kwargs["attn_mask"], kwargs["is_causal"]))
        return sdpa(q, k, v, **kwargs)

    packed = row(text(6, seed=1), text(9, seed=2))
    masked = build(tiny())
    default = build(dataclasses.replace(tiny(), document_masking=False, eos_id=None))
    assert ModelConfig().document_masking is False
    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    with torch.no_grad():
        default(packed)
        assert calls and all(mask is None and causal for mask, causal in calls)
        calls.clear()
        masked(packed)
        assert calls and all(mask is not None and not causal for mask, causal in calls)
        # a row with no EOS is one document: masked and plain forwards agree
        single = text(20, seed=3)
        torch.testing.assert_close(masked(single)[0], unmasked_twin(masked)(single)[0], rtol=0, atol=1e-6)


@pytest.mark.parametrize("pos_encoding", ("learned", "rope"))
def test_kv_cache_decoding_through_end_of_text_equals_the_full_forward(pos_encoding):
    model = build(tiny(pos_encoding=pos_encoding, n_kv_head=2))
    seq = torch.cat([row(text(5, seed=1), text(4, seed=2), text(8, seed=3)), row(text(9, seed=4), text(9, seed=5))])
    assert (seq == EOS).sum() == 3 and seq.size(1) == 19
    # a prefill holding an EOS, then one token at a time (EOS tokens fed back included), and a chunk with
    # an EOS inside it on a non-empty cache: each gives the full forward's next-token logits
    assert_cached_decoding_matches_full(model, seq, prefill=8, chunk=(4, 15))


def test_generation_after_an_end_of_text_starts_a_fresh_document():
    model = build(tiny(pos_encoding="rope"))
    doc1, doc2 = text(7, seed=1)[0].tolist(), text(3, seed=2)[0].tolist()
    prompts = [doc1 + [EOS] + doc2, doc2, [5] + [EOS] + doc2, doc1 + [EOS]]
    batched = generate(model, prompts, 8, temperature=0)
    # a prompt's earlier documents change nothing: what follows its last EOS decides the tokens
    assert batched[0] == batched[1] == batched[2]
    assert batched == [generate(model, [p], 8, temperature=0)[0] for p in prompts]  # left padding changes nothing
    # greedy decoding through the cache is greedy decoding by full recomputation
    seq = list(prompts[3])
    for _ in range(8):
        with torch.no_grad():
            seq.append(int(model(torch.tensor([seq]))[0][0, -1].argmax()))
    assert batched[3] == seq[len(prompts[3]) :]
    # the masked model's continuation differs from the unmasked one's on the same weights
    assert generate(unmasked_twin(model), prompts[:1], 8, temperature=0)[0] != batched[0]


def test_config_validation():
    with pytest.raises(ValueError, match="arch 'lstm' has no attention"):
        ModelConfig(arch="lstm", document_masking=True)
    with pytest.raises(ValueError, match="eos_id 64 is not a token"):
        ModelConfig(vocab_size=64, eos_id=64)
    with pytest.raises(ValueError, match="document_masking needs model.eos_id"):
        GPT(ModelConfig(document_masking=True))
    with pytest.raises(ConfigError, match="model.*document_masking"):
        load_config(None, ["model.document_masking=true", "model.arch=lstm"], schema=PretrainConfig)
    assert load_config(None, ["model.document_masking=true"], schema=PretrainConfig).model.document_masking
    # a checkpoint's model config saved before the feature (no such keys) loads unmasked
    old = {k: v for k, v in dataclasses.asdict(ModelConfig()).items() if k not in ("document_masking", "eos_id")}
    assert ModelConfig(**old).document_masking is False


def test_the_training_driver_takes_the_end_of_text_token_from_the_data():
    from orchestration.train.driver import PretrainFacts, resolve_model

    facts = PretrainFacts(
        manifest={"uri": "data/manifest.json"},
        seq_len=32,
        vocab_size=4097,
        eos_id=4096,
        tokenizer_hash="h",
        total_steps=10,
        val_batches=1,
        tokenizer_files={},
    )
    masked = resolve_model(ModelConfig(document_masking=True), facts)
    assert (masked.vocab_size, masked.eos_id) == (4097, 4096)
    assert resolve_model(ModelConfig(), facts).eos_id is None  # off: the config is as before
    with pytest.raises(ConfigError, match="model.eos_id=7, but the data's tokenizer .* with token 4096"):
        resolve_model(ModelConfig(document_masking=True, eos_id=7), facts)


def test_explicit_attention_keeps_the_document_mask():
    model = build(tiny(pos_encoding="rope"))
    packed = row(text(6, seed=1), text(9, seed=2))
    with torch.no_grad():
        fused, _ = model(packed)
        model.set_explicit_attention(True)
        explicit, _ = model(packed)
    torch.testing.assert_close(explicit, fused, rtol=0, atol=1e-5)
    weights = model.transformer.h[0].attn.attention  # (B, heads, T, T)
    assert weights[..., 7:, :7].abs().amax() == 0  # document 2 gives document 1 no weight


def test_hugging_face_export_refuses_document_masking():
    cfg = tiny(pos_encoding="rope", mlp="swiglu", norm="rmsnorm", bias=False)
    assert hf_family(dataclasses.replace(cfg, document_masking=False)) == "llama"
    assert hf_family(cfg) is None
    assert "model.document_masking=true" in unsupported_reason(cfg)
