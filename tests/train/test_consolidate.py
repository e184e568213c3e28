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
    assert files_to_restore(files, 1) == [
        "ds/mp_rank_00_model_states.pt",
        "ds/zero_pp_rank_1_mp_rank_00_optim_states.pt",
        "ds/zero_pp_rank_1_mp_rank_00_model_states.pt",
        "rng_rank1.pt",
    ]
    assert files_to_restore(files, 10) == [
        "ds/mp_rank_00_model_states.pt",
        "ds/bf16_zero_pp_rank_10_mp_rank_00_optim_states.pt",
        "rng_rank10.pt",
    ]
    # another worker count: the rank reads its share of the universal checkpoint instead (reshard)
    assert files_to_restore(files, 0, engine_files=False) == ["rng_rank0.pt"]


def _stage0_checkpoint(root) -> dict:
    """A complete ZeRO-0 checkpoint directory written by hand (the DDP engine's state file and the
    marker listing it), with no consolidated weights yet; returns the state it holds."""
    import json

    from orchestration.checkpoint_format import CHECKPOINT_META_FILE, DS_TAG, MODEL_CONFIG_FILE, TOKENIZER_FILE
    from orchestration.train.ddp import STATE_FILE

    state = {"w": torch.randn(64, 32), "b": torch.randn(32)}
    (root / DS_TAG).mkdir(parents=True)
    torch.save({"module": state}, root / DS_TAG / STATE_FILE)
    (root / MODEL_CONFIG_FILE).write_text("{}")
    (root / TOKENIZER_FILE).write_text("{}")
    files = {f"{DS_TAG}/{STATE_FILE}": (root / DS_TAG / STATE_FILE).stat().st_size}
    (root / CHECKPOINT_META_FILE).write_text(json.dumps({"step": 3, "zero_stage": 0, "world_size": 1, "files": files}))
    return state


def test_an_interrupted_write_leaves_no_file(tmp_path):
    import pytest

    def tensors():
        yield torch.ones(4)
        raise KeyboardInterrupt  # Ctrl-C during `raylm consolidate`

    specs = [("a", (4,), torch.float32), ("b", (4,), torch.float32)]
    with pytest.raises(KeyboardInterrupt):
        write_safetensors_streaming(tmp_path / "model.safetensors", specs, tensors(), {})
    assert list(tmp_path.iterdir()) == []


def test_two_consolidations_of_one_checkpoint_end_with_one_whole_file(tmp_path):
    """Two writers at once (eval and serve reading one interval checkpoint): the second runs whole
    while the first is halfway; readers never see a part, and the first's rename leaves a whole file."""
    path = tmp_path / "model.safetensors"
    specs = [("a", (1000,), torch.float32), ("b", (1000,), torch.float32)]
    seen = []

    def first_writer():
        yield torch.zeros(1000)
        seen.append(path.exists())  # the first writer's half is not visible
        write_safetensors_streaming(path, specs, iter([torch.ones(1000), torch.ones(1000)]), {})
        seen.append(sorted(load_file(path)))  # the second's file is whole at once
        yield torch.zeros(1000)

    write_safetensors_streaming(path, specs, first_writer(), {})
    assert seen == [False, ["a", "b"]]
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]
    assert torch.equal(load_file(path)["b"], torch.zeros(1000))


def test_a_cut_short_consolidated_file_is_refused_and_rebuilt(tmp_path):
    """A model.safetensors truncated by a pre-atomic write: loading it says so and how to fix it;
    ensure_consolidated (what `raylm consolidate` and every reader call) rebuilds it from ds/."""
    import pytest

    from orchestration.artifacts import RunDir
    from orchestration.checkpoint_format import CheckpointError
    from orchestration.train.checkpoint import ensure_consolidated, load_consolidated_state

    state = _stage0_checkpoint(tmp_path)
    ckpt = RunDir.at(str(tmp_path))
    assert ensure_consolidated(ckpt) and not ensure_consolidated(ckpt)  # written once, then whole
    whole = (tmp_path / "model.safetensors").read_bytes()
    for cut in (len(whole) - 100, 20):  # a tensor cut short; the header itself cut short
        (tmp_path / "model.safetensors").write_bytes(whole[:cut])
        with pytest.raises(CheckpointError, match="cut short .*raylm consolidate"):
            load_consolidated_state(str(tmp_path))
        assert ensure_consolidated(ckpt)
        loaded, _, _, meta = load_consolidated_state(str(tmp_path))
        assert meta["step"] == 3 and all(torch.equal(loaded[k], v) for k, v in state.items())
