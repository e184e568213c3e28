"""Resharding ZeRO state for another worker count: converted once per checkpoint, read by share.

A checkpoint's ZeRO partitions (stages 1-3) fit only the worker count that wrote them. The first
resume on another count converts them to DeepSpeed's universal checkpoint (each parameter's fp32
weights and Adam moments whole, which any partitioning loads) once (``ensure_universal``): global
rank 0 fetches the engine files, converts them in a temp dir and writes the result into the
checkpoint's own ``universal/`` directory, its marker (``raylm_meta.json``, every file and its size)
last, while the other ranks wait at a barrier. Later resizes of that checkpoint find the marker and
convert nothing. What every rank loads whole is kept small: the universal copy's ZeRO-1/2 model
states hold no weights (a universal load rebuilds them from the fp32 masters, ``update_lp_params``)
and its ZeRO-3 optimizer state holds no partition (the converter copies source rank 0's there).
A branch's checkpoint belongs to another run: its universal copy goes under the branching run
(``universal_dir_for``).

Each rank then fetches only what its partition loads (``fetched_universal``): the byte range of its
slice of each parameter file (ZeRO-1/2: the fragments its flat partition overlaps; ZeRO-3: a slice
of every parameter), written into a sparse local copy whose holes are never read (loaded through
mmap). Temp space is removed on success and on failure.
``ReshardStats`` counts what it cost: the first metrics record carries every rank's.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import re
import shutil
import tempfile
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import pyarrow.fs as pafs
import torch
import torch.utils.serialization

from orchestration.artifacts import RunDir
from orchestration.checkpoint_format import (
    CHECKPOINT_META_FILE,
    DS_TAG,
    UNIVERSAL_DIR,
    CheckpointError,
    complete_checkpoint_meta,
)
from orchestration.train.checkpoint import download

PARAM_FILES = f"{DS_TAG}/zero/"  # universal layout: ds/zero/<parameter name>/<fp32|exp_avg|exp_avg_sq|step>.pt
_OTHER_RANKS_MODEL_STATES = re.compile(r"zero_pp_rank_(?!0_)\d+_mp_rank_\d+_model_states\.pt$")


@dataclass
class ReshardStats:
    """One rank's reshard: bytes it downloaded to load its partition, the conversion's own download
    (rank 0, once per checkpoint), its temp disk at the peak, and the conversions it ran."""

    downloaded_bytes: int = 0
    conversion_downloaded_bytes: int = 0
    temp_peak_bytes: int = 0
    conversions: int = 0
    universal_bytes: int = 0  # what the ranks load of the universal checkpoint: a rank's share is this / ranks


def universal_dir_for(ckpt: RunDir, run: RunDir) -> RunDir:
    """Where ``ckpt``'s universal copy lives: inside it when it is one of ``run``'s own checkpoints;
    for a checkpoint of another run (a branch), under ``run`` (``universal_<checkpoint name>``), so no
    run writes into another's directory, which may be read-only."""
    if ckpt.uri.startswith(run.uri + "/"):
        return ckpt.child(UNIVERSAL_DIR)
    return run.child(f"{UNIVERSAL_DIR}_{ckpt.name}")


def ensure_universal(ckpt: RunDir, meta: dict, universal: RunDir, rank: int, stats: ReshardStats) -> dict:
    """The marker of ``ckpt``'s universal copy at ``universal``, converted first by rank 0 when there
    is none yet for this checkpoint. The other ranks wait for the marker by polling storage, not at a
    collective whose timeout a long conversion would outlast; if rank 0 fails, Ray ends them."""
    import time

    from data_pipeline.storage import with_retries

    stamp = with_retries(lambda: _source_stamp(ckpt), what=ckpt.uri)

    def converted() -> Optional[dict]:  # a marker left by an earlier checkpoint written there is stale
        marker = with_retries(lambda: complete_checkpoint_meta(universal), what=universal.uri)
        return marker if marker and marker.get("source") == stamp else None

    marker = converted()
    if marker is None and rank == 0:
        convert_to_universal(ckpt, meta, universal, stats, stamp)
        marker = converted()
        if marker is None:
            raise CheckpointError(f"{universal.uri} is incomplete after its conversion: delete it to convert again")
    while marker is None:  # the other ranks, until rank 0's conversion is complete
        time.sleep(2.0)
        marker = converted()
    return marker


def _source_stamp(ckpt: RunDir) -> str:
    """What identifies the checkpoint a universal copy was converted from: its marker's write time."""
    return str(ckpt.fs.get_file_info(ckpt.path_of(CHECKPOINT_META_FILE)).mtime)


def convert_to_universal(ckpt: RunDir, meta: dict, universal: RunDir, stats: ReshardStats, stamp: str) -> None:
    """Convert ``ckpt``'s engine files to a universal checkpoint at ``universal`` (marker last), through
    a temp dir that is removed however it ends."""
    from data_pipeline.storage import with_retries

    root = Path(tempfile.mkdtemp(prefix="raylm_reshard_"))
    try:
        with _DiskPeak(root) as peak:
            source = ckpt.path
            if not isinstance(ckpt.fs, pafs.LocalFileSystem):
                source = str(root / "in")
                names = [name for name in meta["files"] if name.startswith(f"{DS_TAG}/")]
                stats.conversion_downloaded_bytes += download(ckpt, names, source)
            out = root / "out"
            _ds_to_universal(os.path.join(source, DS_TAG), str(out / DS_TAG))
            if meta.get("zero_stage", 1) < 3:
                _drop_module_weights(out / DS_TAG / "mp_rank_00_model_states.pt")
            else:
                _drop_partition_state(out / DS_TAG / "zero" / "optimizer_state.pt")
        files = {str(p.relative_to(out)): p.stat().st_size for p in sorted(out.rglob("*")) if p.is_file()}
        copy = functools.partial(
            pafs.copy_files,
            str(out),
            universal.path,
            source_filesystem=pafs.LocalFileSystem(),
            destination_filesystem=ckpt.fs,
        )
        with_retries(copy, what=universal.uri)
        universal.write_json(
            CHECKPOINT_META_FILE,
            {
                "source": stamp,
                "step": meta["step"],
                "source_world_size": meta["world_size"],
                "zero_stage": meta.get("zero_stage"),
                "files": files,
            },
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    stats.temp_peak_bytes = max(stats.temp_peak_bytes, peak.bytes)
    stats.conversions += 1
    print(
        f"[raylm] converted {ckpt.uri} (ZeRO-{meta.get('zero_stage')}, {meta['world_size']} workers) to a universal "
        f"checkpoint once, for this and later resizes: {universal.uri} ({sum(files.values()) / 1e6:,.1f} MB)",
        flush=True,
    )


def _ds_to_universal(input_folder: str, output_folder: str) -> None:
    import argparse
    import io

    from orchestration.train.engine import import_deepspeed

    import_deepspeed()  # before DeepSpeed's first import in this worker: without its mlflow import
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    args = argparse.Namespace(
        input_folder=input_folder,
        output_folder=output_folder,
        num_extract_workers=1,
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,  # torch's AdamW leaves out state the converter looks for
    )
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # progress bars
        ds_to_universal(args)


def _drop_module_weights(model_states: Path) -> None:
    """Empty the module (and frozen-parameter) weights of a ZeRO-1/2 model-states file: in universal
    mode DeepSpeed does not load the module from it (every trained parameter comes from the fp32
    masters, ``update_lp_params``; frozen ones keep the values the model was built with), yet every
    rank would download it."""
    state = torch.load(model_states, map_location="cpu", weights_only=False)
    state["module"] = {}
    state.pop("frozen_param_fragments", None)
    torch.save(state, model_states)


def _drop_partition_state(optimizer_state: Path) -> None:
    """Remove the source rank 0's optimizer partition from a ZeRO-3 universal ``optimizer_state.pt``
    (DeepSpeed's converter copies that rank's whole state there; its load reads only the loss-scale
    fields, the step and the param groups), so each rank does not download half a checkpoint."""
    from deepspeed.checkpoint.constants import FP32_FLAT_GROUPS, OPTIMIZER_STATE_DICT

    state = torch.load(optimizer_state, map_location="cpu", weights_only=False)
    state.pop(FP32_FLAT_GROUPS, None)
    base = state[OPTIMIZER_STATE_DICT]
    base["state"] = {key: {"step": value["step"]} for key, value in base["state"].items() if "step" in value}
    torch.save(state, optimizer_state)


def partition_reads(engine, files: dict[str, int], rank: int, world_size: int) -> dict[str, Optional[tuple[int, int]]]:
    """The universal files this rank's engine loads, each with None (the whole file) or the
    (first element, count) of the parameter slice it reads: ZeRO-1/2 the fragment of each parameter
    its flat partition overlaps; ZeRO-3 every parameter's slice of ceil(numel / ranks)."""
    import torch.distributed as dist

    names = {param: name for name, param in engine.module.named_parameters()}
    if engine.zero_optimization_stage() == 3:
        wanted = {}
        for param, name in names.items():
            group = getattr(param, "ds_process_group", None)  # a subgroup under MiCS / hpZ
            ranks = dist.get_world_size(group) if group is not None else world_size
            index = dist.get_rank(group) if group is not None else rank
            per_rank = math.ceil(param.ds_numel / ranks)
            first = min(index * per_rank, param.ds_numel)
            wanted[name] = (first, min(per_rank, param.ds_numel - first))
    else:
        wanted = {}
        for param, name in names.items():
            mapping = getattr(param, "_hp_mapping", None)  # set where this rank's partition holds a fragment
            if mapping is not None:
                wanted[name] = (mapping.lp_fragment_address.start, mapping.lp_fragment_address.numel)
    reads: dict[str, Optional[tuple[int, int]]] = {}
    for file in files:
        param, state = _param_file(file)
        if _OTHER_RANKS_MODEL_STATES.search(file):  # a universal load reads source rank 0's
            continue
        if param is None:  # model states, optimizer_state.pt, latest_universal
            reads[file] = None
        elif param in wanted:
            reads[file] = None if state == "step.pt" else wanted[param]
    return reads


def loaded_bytes(engine, files: dict[str, int]) -> int:
    """Bytes of the universal checkpoint that some rank loads: all of it but the copy DeepSpeed writes
    of a tied alias (lm_head.weight = wte), which is not a parameter of its own."""
    names = {name for name, _ in engine.module.named_parameters()}
    return sum(size for file, size in files.items() if _param_file(file)[0] in names | {None})


def _param_file(file: str) -> tuple[Optional[str], Optional[str]]:
    """(parameter name, state file) of a universal parameter file, (None, None) for the others."""
    rest = file[len(PARAM_FILES) :] if file.startswith(PARAM_FILES) else ""
    if "/" not in rest:
        return None, None
    param, state = rest.rsplit("/", 1)
    return param, state


@contextlib.contextmanager
def fetched_universal(
    universal: RunDir, marker: dict, engine, rank: int, world_size: int, stats: ReshardStats
) -> Iterator[str]:
    """A local directory holding what this rank loads of the universal checkpoint at ``universal``: in
    place on a local (or shared) filesystem, otherwise only ``partition_reads`` downloaded into a temp
    dir (slices as sparse files, loaded through mmap), removed on exit."""
    stats.universal_bytes = loaded_bytes(engine, marker["files"])
    if isinstance(universal.fs, pafs.LocalFileSystem):
        yield universal.path
        return
    from data_pipeline.storage import with_retries

    local = Path(tempfile.mkdtemp(prefix=f"raylm_universal_rank{rank}_"))
    mmap_before = torch.utils.serialization.config.load.mmap
    try:
        for name, elements in partition_reads(engine, marker["files"], rank, world_size).items():
            target = local / name
            target.parent.mkdir(parents=True, exist_ok=True)
            fetch = functools.partial(read_file_slice, universal.fs, universal.path_of(name), target, elements)
            stats.downloaded_bytes += with_retries(fetch, what=universal.uri_of(name))
        stats.temp_peak_bytes = max(stats.temp_peak_bytes, disk_bytes(local))
        torch.utils.serialization.config.load.mmap = True  # a sparse file's holes are never read
        yield str(local)
    finally:
        torch.utils.serialization.config.load.mmap = mmap_before
        shutil.rmtree(local, ignore_errors=True)


def read_file_slice(fs: pafs.FileSystem, path: str, target: Path, elements: Optional[tuple[int, int]]) -> int:
    """Copy a ``torch.save`` file to ``target``, or, given (first element, count), only its zip
    structure, its pickle and that slice of its one tensor's bytes (the rest left a hole of the
    file's length). Returns the bytes read."""
    with fs.open_input_file(path) as remote:
        size = remote.size()
        if elements is None:
            target.write_bytes(remote.read_at(size, 0))
            return size
        counted = _CountingFile(remote)
        storages = [info for info in zipfile.ZipFile(counted).infolist() if "/data/" in info.filename]
        if len(storages) != 1:  # not one tensor: whole
            target.write_bytes(remote.read_at(size, 0))
            return size
        storage = storages[0]
        header = remote.read_at(30, storage.header_offset)  # the entry's local header: its data follows
        name_len, extra_len = int.from_bytes(header[26:28], "little"), int.from_bytes(header[28:30], "little")
        start = storage.header_offset + 30 + name_len + extra_len
        end = start + storage.file_size
        with open(target, "wb") as out:
            out.truncate(size)
            for lo, hi in ((0, start), (end, size)):  # everything but the tensor's bytes: headers, pickle
                out.seek(lo)
                out.write(remote.read_at(hi - lo, lo))
        read = counted.bytes + 30 + start + (size - end)
        tensor = torch.load(target, mmap=True, weights_only=False)
        tensor = tensor.get("param") if isinstance(tensor, dict) else tensor
        if not isinstance(tensor, torch.Tensor) or not tensor.is_contiguous():
            target.write_bytes(remote.read_at(size, 0))
            return read + size
        first, count = elements
        lo = start + (tensor.storage_offset() + first) * tensor.element_size()
        with open(target, "r+b") as out:
            out.seek(lo)
            out.write(remote.read_at(count * tensor.element_size(), lo))
        return read + count * tensor.element_size()


def disk_bytes(root: Path) -> int:
    """Disk blocks used under ``root`` (a sparse file's holes use none)."""
    return sum(p.stat().st_blocks * 512 for p in root.rglob("*") if p.is_file())


class _CountingFile:
    """A seekable remote file for ``zipfile`` that counts the bytes read through it."""

    def __init__(self, remote):
        self.remote, self.bytes = remote, 0

    def read(self, n: int = -1) -> bytes:
        data = self.remote.read(n if n is not None and n >= 0 else None)
        self.bytes += len(data)
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.remote.seek(offset, whence)

    def tell(self) -> int:
        return self.remote.tell()

    def seekable(self) -> bool:
        return True


class _DiskPeak:
    """The largest ``disk_bytes(root)`` seen while the block runs (sampled every 0.5 s)."""

    def __init__(self, root: Path):
        self.root, self.bytes, self._done = root, 0, threading.Event()

    def _watch(self) -> None:
        while not self._done.wait(0.5):
            with contextlib.suppress(OSError):  # a file removed while listed
                self.bytes = max(self.bytes, disk_bytes(self.root))

    def __enter__(self) -> _DiskPeak:
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()
        self.bytes = max(self.bytes, disk_bytes(self.root))
