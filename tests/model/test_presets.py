"""Preset names that say their size, and the size table `raylm model-info --list` prints."""

from __future__ import annotations

import re

from model.config import PRESETS, model_config_from_preset
from model.flops import count_params, preset_size_table, preset_size_table_text


def test_ladder_names_match_their_parameter_counts():
    ladder = [name for name in PRESETS if name.startswith("ladder-")]
    assert len(ladder) == 4
    for name in ladder:
        cfg = model_config_from_preset(name)
        named = float(re.fullmatch(r"ladder-(\d+)m", name).group(1)) * 1e6
        assert abs(count_params(cfg) - named) < 0.02 * named, (name, count_params(cfg))
        assert cfg.n_embd == 64 * cfg.n_layer and cfg.head_dim == 64  # the ladder's aspect-ratio rule


def test_size_table_has_every_preset_with_its_counts():
    rows = preset_size_table()
    assert [r["name"] for r in rows] == list(PRESETS)
    for r in rows:
        cfg = model_config_from_preset(r["name"])
        assert r["params"] == count_params(cfg)
        assert r["non_embedding_params"] == count_params(cfg, non_embedding=True)
        assert (r["n_layer"], r["n_embd"], r["vocab_size"]) == (cfg.n_layer, cfg.n_embd, cfg.vocab_size)
    text = preset_size_table_text().splitlines()
    assert len(text) == len(PRESETS) + 1
    assert text[0].split()[0] == "preset" and "124.48M" in next(t for t in text if t.startswith("gpt2-small"))
    assert "23.20M" in next(t for t in text if t.startswith("ladder-23m"))
