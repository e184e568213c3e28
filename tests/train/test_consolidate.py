"""Consolidated weights streamed into safetensors, and the files a resuming rank fetches."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from orchestration.train.checkpoint import files_to_restore
from orchestration.train.consolidate import write_safetensors_streaming


def test_streamed_safetensors_read_back_exactly(tmp_path):
    tensors = {
        "w": torch.randn(3, 5),
        "half": torch.randn(7).to(torch.bfloat16),
        "scalar": torch.tensor(2.5),
        "index": torch.arange(6).reshape(2, 3),
        "mask": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 4),
    }
    specs = [(name, tuple(t.shape), t.dtype) for name, t in tensors.items()]
    path = tmp_path / "model.safetensors"
    written = write_safetensors_streaming(path, specs, iter(tensors.values()), {"step": 7})
    assert written == path.stat().st_size
    back = load_file(path)
    assert back.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name


def test_a_tensor_of_the_wrong_shape_is_refused(tmp_path):
    import pytest

    with pytest.raises(ValueError, match=r"w: shape \(2, 2\), expected \(4,\)"):
        write_safetensors_streaming(tmp_path / "m.safetensors", [("w", (4,), torch.float32)], [torch.ones(2, 2)], {})


def test_a_resuming_rank_fetches_its_own_partitions_and_the_shared_states():
    files = {
        "ds/mp_rank_00_model_states.pt": 1,
        "ds/zero_pp_rank_0_mp_rank_00_optim_states.pt": 1,
        "ds/zero_pp_rank_1_mp_rank_00_optim_states.pt": 1,
        "ds/bf16_zero_pp_rank_10_mp_rank_00_optim_states.pt": 1,
        "ds/zero_pp_rank_1_mp_rank_00_model_states.pt": 1,
        "rng_rank0.pt": 1,
        "rng_rank1.pt": 1,
        "rng_rank10.pt": 1,
        "model.safetensors": 1,
        "model_config.json": 1,
        "tokenizer.json": 1,
        "latest": 1,
    }
    assert files_to_restore(files, 1, resharding=False) == [
        "ds/mp_rank_00_model_states.pt",
        "ds/zero_pp_rank_1_mp_rank_00_optim_states.pt",
        "ds/zero_pp_rank_1_mp_rank_00_model_states.pt",
        "rng_rank1.pt",
    ]
    assert files_to_restore(files, 10, resharding=False) == [
        "ds/mp_rank_00_model_states.pt",
        "ds/bf16_zero_pp_rank_10_mp_rank_00_optim_states.pt",
        "rng_rank10.pt",
    ]
    # another worker count: every rank's partitions go into the universal conversion
    assert files_to_restore(files, 0, resharding=True) == [f for f in files if f.startswith("ds/")] + ["rng_rank0.pt"]
