"""The driver's console during training: one line per log interval, printed once, with an ETA.

Rank 0 writes every interval's record to ``metrics.jsonl``; the driver follows that file on a
background thread and prints each new record (step, loss, lr, tokens/s, MFU or FLOP/s, data wait,
val, ETA). On a terminal a progress bar sits under the lines. Workers print nothing per step, so
Ray's forwarded worker logs can stay off (``raylm --verbose`` turns them back on) without losing
a line: everything is in the run directory and Ray's session logs.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Optional

from orchestration.artifacts import RunDir, read_metrics


def format_record(record: dict, total_steps: int) -> str:
    """One console line for a metrics record."""
    parts = [
        f"step {record['step']}/{total_steps}",
        f"loss {record['loss']:.4f}",
        f"lr {record['lr']:.2e}",
        f"{record['tokens_per_s']:,.0f} tok/s",
        f"wait {record['data_wait_s'] * 1e3:.1f} ms",
    ]
    if record.get("mfu") is not None:
        parts.append(f"mfu {record['mfu']:.1%}")
    else:
        parts.append(f"{record['flops_per_s'] / 1e9:.1f} GFLOP/s")
    if "val_loss" in record:
        parts.append(f"val {record['val_loss']:.4f}")
        if "val_perplexity" in record:
            parts.append(f"(ppl {record['val_perplexity']:.1f})")
        if "val_accuracy" in record:
            parts.append(f"acc {record['val_accuracy']:.3f}")
        per_source = [f"{k.split('/', 1)[1]} {v:.4f}" for k, v in record.items() if k.startswith("val_loss/")]
        if per_source:  # a data mixture: each source's own val loss
            parts.append(f"({', '.join(per_source)})")
    if "dp_epsilon" in record:
        parts.append(f"eps {record['dp_epsilon']:.3g} (delta {record['dp_delta']:g})")
    if "checkpoint_s" in record:
        parts.append(f"ckpt {record['checkpoint_s']:.1f} s")
    if "best_val_loss" in record:
        parts.append(f"best {record['best_val_loss']:.4f}")
        if record["stopped_early"]:
            parts.append(f"early stop ({record['evals_without_improvement']} evals without improvement)")
    if record.get("stopped_on_request"):
        parts.append("stopped on request (raylm stop)")
    return " | ".join(parts)


def eta_text(seconds: Optional[float]) -> str:
    if seconds is None:
        return "eta -"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"eta {hours}:{minutes:02d}:{secs:02d}" if hours else f"eta {minutes}:{secs:02d}"


class ProgressPrinter:
    """Follows a run's metrics.jsonl from the driver while the trainer runs; ``stop()`` prints what
    is left. Records already in the file when it starts (a resumed run) are not printed again."""

    def __init__(self, run: RunDir, total_steps: int, *, poll_s: float = 2.0):
        self.run, self.total_steps, self.poll_s = run, total_steps, poll_s
        self.printed = len(read_metrics(run))
        self._first: Optional[tuple[float, int]] = None  # (wall time, step) of the first new record
        self._stop = threading.Event()
        self._bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, unit="step", dynamic_ncols=True, leave=False)
        self._thread = threading.Thread(target=self._follow, name="raylm-progress", daemon=True)

    def start(self) -> ProgressPrinter:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        try:
            self._print_new()
        except OSError as err:  # storage down as the run ends: the lines are in metrics.jsonl
            print(f"[raylm] could not read the last metrics records ({err})", flush=True)
        if self._bar is not None:
            self._bar.close()

    def _follow(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self._print_new()
            except OSError:  # a flush in progress or a storage blip: the next poll reads it
                continue

    def _print_new(self) -> None:
        records = read_metrics(self.run)
        for record in records[self.printed :]:
            now = time.monotonic()
            if self._first is None:
                self._first = (now, record["step"])  # ETA from the run's own pace, startup excluded
            t0, step0 = self._first
            done = record["step"] - step0
            eta = (now - t0) / done * (self.total_steps - record["step"]) if done > 0 and now > t0 else None
            line = f"[raylm] {format_record(record, self.total_steps)} | {eta_text(eta)}"
            if self._bar is not None:
                self._bar.write(line)
                self._bar.n = record["step"]
                self._bar.refresh()
            else:
                print(line, flush=True)
        self.printed = max(self.printed, len(records))
