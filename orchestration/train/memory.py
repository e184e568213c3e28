"""A rank's peak memory by phase (build, engine init, the first step's forward / backward / optimizer
step, the first eval and save), measured rather than modelled, so a user sees what a stage spends.

On a GPU the figure is torch's allocator peak (``max_memory_allocated``, reset between phases); on
CPU it is the process's resident-set high-water mark (VmHWM in /proc/self/status), which Linux resets
to the current RSS when "5" is written to /proc/self/clear_refs. Resetting loses the lifetime peak
the OS or torch kept, so ``MemoryPhases`` keeps it: ``peak_bytes`` is the rank's peak since start.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from contextlib import contextmanager

import torch

_STATUS, _CLEAR_REFS = "/proc/self/status", "/proc/self/clear_refs"


def current_bytes(device: torch.device) -> int:
    """Memory held now: bytes allocated on the GPU, or the process's resident set on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    return _status_kib("VmRSS") * 1024


def _hiwater_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return _status_kib("VmHWM") * 1024


def _reset_hiwater(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    with open(_CLEAR_REFS, "w") as f:
        f.write("5")


def _status_kib(field: str) -> int:
    with open(_STATUS) as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{_STATUS} has no {field} line: per-phase memory needs Linux")


class MemoryPhases:
    """Phase peaks in the order measured: ``end(phase)`` closes the phase that ran since the previous
    ``end`` (or since construction). A phase ended again (each micro-batch's forward) keeps its
    largest peak. ``take_new()`` returns the phases not yet reported, for the next metrics record."""

    def __init__(self, device: torch.device):
        self.device = device
        self.baseline_bytes = current_bytes(device)  # before the model exists: the process itself
        self.peaks: dict[str, int] = {}
        self._lifetime = _hiwater_bytes(device)
        self._reported: set[str] = set()
        _reset_hiwater(device)

    def start(self) -> None:
        """Begin a phase that does not follow the previous one directly (an eval after many steps)."""
        self._lifetime = max(self._lifetime, _hiwater_bytes(self.device))
        _reset_hiwater(self.device)

    def end(self, phase: str) -> None:
        peak = _hiwater_bytes(self.device)
        self._lifetime = max(self._lifetime, peak)
        self.peaks[phase] = max(self.peaks.get(phase, 0), peak)
        _reset_hiwater(self.device)

    @contextmanager
    def first(self, phase: str):
        """Measure what the block does as ``phase``, the first time only (later evals and saves run
        unmeasured, so the phase keeps the figure reported for it)."""
        if phase in self.peaks:
            yield
            return
        self.start()
        yield
        self.end(phase)

    def measured(self, phase: str) -> bool:
        return phase in self.peaks

    def peak_bytes(self) -> int:
        """The rank's peak since the process started (every phase, and everything between)."""
        self._lifetime = max(self._lifetime, _hiwater_bytes(self.device))
        return self._lifetime

    def take_new(self) -> dict[str, int]:
        new = {phase: peak for phase, peak in self.peaks.items() if phase not in self._reported}
        self._reported.update(new)
        return new


def return_large_frees_to_os(threshold_bytes: int = 1 << 20) -> bool:
    """Make glibc serve allocations of ``threshold_bytes`` and more with their own mappings, which go
    back to the OS when freed. By default glibc raises that threshold to the largest block freed so
    far (up to 32 MB), so a CPU ZeRO-3 rank, which allocates and frees every layer's gathered weights
    each pass, keeps them all resident: measured on GPT-2 medium, 2 ranks, its resident set grew to
    6.9 GB per rank over 3.1 GB of live tensors; with a 1 MiB threshold, 4.0 GB, at the price of page
    faults on each large allocation (steps 12 s -> 15 s there). Called by CPU workers at ZeRO-3, where
    memory is the point (``configure_allocator``). Returns False where the C library is not glibc."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    M_MMAP_THRESHOLD = -3
    return bool(mallopt(M_MMAP_THRESHOLD, threshold_bytes))


def configure_allocator(device: torch.device, zero_stage: int) -> None:
    """What a worker sets before building its model: large frees go back to the OS on a CPU rank at
    ZeRO-3 (``return_large_frees_to_os``); other stages keep glibc's faster default."""
    if device.type == "cpu" and zero_stage == 3:
        return_large_frees_to_os()
