"""Recurrent language models, the pre-transformer neural baselines, behind the same seams as the GPT.

``RecurrentLM(cfg)`` takes a ``ModelConfig`` whose arch is one of ``RECURRENT_ARCHS``: "rnn" (Elman,
tanh), "gru" or "lstm". n_embd is both the embedding and the hidden size (so the output can reuse the
embedding matrix when tie_embeddings), n_layer stacked recurrent layers, dropout on the embeddings,
between layers and before the head (Zaremba et al. 2014), bias for the gates. The attention fields
(n_head, pos_encoding, mlp, norm, ...) are ignored: recurrence carries position. ``forward(idx,
targets)`` returns (logits, loss) like ``GPT.forward``, so the training loop, checkpoints and eval use
it unchanged; ``decode`` carries the recurrent state (h, or (h, c) for the LSTM) for generation, the
counterpart of the GPT's KV cache. ``model.build.build_model`` picks the class.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from model.config import RECURRENT_ARCHS, ModelConfig

# arch -> (torch module, its extra keyword arguments); gates per layer are in model.flops.RECURRENT_GATES
_CELLS = {"rnn": (nn.RNN, {"nonlinearity": "tanh"}), "gru": (nn.GRU, {}), "lstm": (nn.LSTM, {})}


class RecurrentLM(nn.Module):
    """Embedding -> dropout -> n_layer RNN / GRU / LSTM -> dropout -> lm_head (tied to the embedding by
    default). The recurrent module is registered under the arch's name ("lstm.weight_ih_l0", ...), so
    a checkpoint's keys say which cell it holds."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.arch not in RECURRENT_ARCHS:
            raise ValueError(f"RecurrentLM needs ModelConfig(arch in {RECURRENT_ARCHS}), got arch={cfg.arch!r}")
        self.cfg = cfg
        d = cfg.n_embd
        self.wte = nn.Embedding(cfg.vocab_size, d)
        self.drop = nn.Dropout(cfg.dropout)
        cell, kwargs = _CELLS[cfg.arch]
        self.add_module(
            cfg.arch,
            cell(
                d,
                d,
                num_layers=cfg.n_layer,
                bias=cfg.bias,
                batch_first=True,
                dropout=cfg.dropout if cfg.n_layer > 1 else 0.0,
                **kwargs,
            ),
        )
        self.lm_head = nn.Linear(d, cfg.vocab_size, bias=False)
        nn.init.normal_(self.wte.weight, mean=0.0, std=cfg.init_std)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        else:
            nn.init.normal_(self.lm_head.weight, mean=0.0, std=cfg.init_std)
        self._init_forget_bias()

    @property
    def recurrent(self) -> nn.RNNBase:
        """The nn.RNN / nn.GRU / nn.LSTM stack."""
        return getattr(self, self.cfg.arch)

    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Draw every parameter again from the constructor's distributions, in place (used by
        ``model.build.materialize`` after a meta-device build): recurrent weights and biases
        ~ U(-1/sqrt(d), 1/sqrt(d)) as torch does, embedding and head ~ N(0, init_std), LSTM forget-gate
        bias 1."""
        cfg, bound = self.cfg, 1.0 / math.sqrt(self.cfg.n_embd)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        for p in self.recurrent.parameters():
            nn.init.uniform_(p, -bound, bound, generator=generator)
        nn.init.normal_(self.wte.weight, mean=0.0, std=cfg.init_std, generator=generator)
        if not cfg.tie_embeddings:
            nn.init.normal_(self.lm_head.weight, mean=0.0, std=cfg.init_std, generator=generator)
        self._init_forget_bias()

    def _init_forget_bias(self) -> None:
        if self.cfg.arch == "lstm" and self.cfg.bias:
            # Forget-gate bias 1 (PyTorch gate order i, f, g, o; two bias vectors, so 0.5 each):
            # remembering by default eases gradient flow early in training (Jozefowicz et al. 2015).
            d = self.cfg.n_embd
            with torch.no_grad():
                for name, p in self.recurrent.named_parameters():
                    if name.startswith("bias"):
                        p.zero_()
                        p[d : 2 * d] = 0.5

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None, kv_cache=None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx (B, T) token ids -> (logits (B, T, vocab), mean cross-entropy against targets or None;
        targets of -1 are ignored). Every sequence starts from a zero state."""
        if kv_cache is not None:
            raise NotImplementedError(
                f"RecurrentLM ({self.cfg.arch}) has no KV cache: it carries its recurrent state; sample with "
                "model.generate.generate, which calls RecurrentLM.decode"
            )
        x = self.drop(self.wte(idx))
        x, _ = self.recurrent(x)
        logits = self.lm_head(self.drop(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def decode(
        self, idx: torch.Tensor, state=None, lengths: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | tuple[torch.Tensor, torch.Tensor]]:
        """Generation step: idx (B, T) continues ``state`` (None: a zero state, as in training) ->
        (logits (B, vocab) of the token after each row's last real token, the state there: h, or
        (h, c) for the LSTM).

        ``lengths`` (B,) marks right-padded rows of different lengths: they are packed, so padding
        never enters the state and a row of a batch ends exactly where that row run alone would.
        """
        x = self.drop(self.wte(idx))
        if lengths is None:
            out, state = self.recurrent(x, state)
            return self.lm_head(self.drop(out[:, -1])), state
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        packed, state = self.recurrent(packed, state)
        out, _ = pad_packed_sequence(packed, batch_first=True)
        last = out[torch.arange(idx.size(0), device=idx.device), lengths - 1]
        return self.lm_head(self.drop(last)), state
