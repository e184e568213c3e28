"""Every file a run, fine-tune, sweep or search writes: one name and one reader/writer each.

A ``RunDir`` is a directory (local path or s3:// / gs:// / az:// URI) whose filesystem is resolved once; every
artifact below is read and written through it, so each command works on object storage as it does
locally. The report renders what these writers stored and never recomputes it.

    run dir      config.yaml, run.json, metrics.jsonl, checkpoint_<step>/ (``checkpoint_format``),
                 finetune_summary.json, finetune.md, demo_summary.json, report.html / report.md / results.json,
                 stop_requested
    tune dir     tune_results.json, best_config.yaml, runs/<trial>/ (run dirs)
    sweep dir    scaling_points.json, scaling_fit.json, points/<key>.json, runs/<key>/ (run dirs)
    baselines    baselines.json, baselines.md
    tokenizers   config.yaml, tokenizer_study.json, tokenizer_study.md (``raylm tokenizers``)
    mup check    mup_check.json (``raylm mup-check``)
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from typing import Any, Optional

import pyarrow.fs as pafs
import yaml

CONFIG_FILE = "config.yaml"
RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
FINETUNE_SUMMARY_FILE, FINETUNE_MARKDOWN_FILE = "finetune_summary.json", "finetune.md"
DEMO_SUMMARY_FILE = "demo_summary.json"
PRIVACY_AUDIT_FILE = "privacy_audit.json"  # `raylm eval --suite privacy` on a checkpoint of the run
STOP_REQUEST_FILE = "stop_requested"  # `raylm stop`: the run checkpoints at its next log interval and ends
LATEST_RUN_FILE = "latest_run"  # in <storage>/<run_name>: the URI of that name's newest timestamped run
TUNE_RESULTS_FILE, BEST_CONFIG_FILE = "tune_results.json", "best_config.yaml"
SCALING_POINTS_FILE, SCALING_FIT_FILE, POINTS_DIR = "scaling_points.json", "scaling_fit.json", "points"
BASELINES_FILE, BASELINES_MARKDOWN_FILE = "baselines.json", "baselines.md"
TOKENIZER_STUDY_FILE, TOKENIZER_STUDY_MARKDOWN_FILE = "tokenizer_study.json", "tokenizer_study.md"
MUP_CHECK_FILE = "mup_check.json"


def absolute_uri(uri: str) -> str:
    """A local path made absolute against the current directory; URIs (s3://, gs://, ...) unchanged."""
    from pathlib import Path

    return uri if "://" in uri else str(Path(uri).expanduser().absolute())


@dataclass(frozen=True)
class RunDir:
    """A directory on any pyarrow filesystem: ``uri`` as the user wrote it (made absolute when local),
    ``fs`` and ``path`` resolved once. Cheap to pickle (Ray workers, Tune trials)."""

    uri: str
    fs: pafs.FileSystem
    path: str
    endpoint_url: Optional[str] = None

    @classmethod
    def at(cls, uri: str, endpoint_url: Optional[str] = None) -> RunDir:
        from data_pipeline.storage import filesystem_for

        uri = absolute_uri(uri).rstrip("/")
        fs, path = filesystem_for(uri, endpoint_url)
        return cls(uri, fs, path, endpoint_url)

    def child(self, name: str) -> RunDir:
        return RunDir(f"{self.uri}/{name}", self.fs, f"{self.path}/{name}", self.endpoint_url)

    def uri_of(self, name: str) -> str:
        return f"{self.uri}/{name}"

    def path_of(self, name: str) -> str:
        return f"{self.path}/{name}"

    @property
    def name(self) -> str:
        return self.uri.rsplit("/", 1)[-1]

    @property
    def parent_path(self) -> str:
        return self.path.rsplit("/", 1)[0]

    def exists(self) -> bool:
        return self.fs.get_file_info(self.path).type == pafs.FileType.Directory

    def has(self, name: str) -> bool:
        return self.fs.get_file_info(self.path_of(name)).type == pafs.FileType.File

    def has_dir(self, name: str) -> bool:
        return self.fs.get_file_info(self.path_of(name)).type == pafs.FileType.Directory

    def names(self) -> set[str]:
        """Entries directly inside (empty when the directory does not exist)."""
        from data_pipeline.storage import list_dir

        if not self.exists():
            return set()
        return {i.base_name for i in list_dir(self.fs, self.path)}

    def read_bytes(self, name: str) -> bytes:
        with self.fs.open_input_stream(self.path_of(name)) as f:
            return f.read()

    def write_bytes(self, name: str, data: bytes) -> str:
        """Write ``name`` (parents created); returns its URI."""
        from data_pipeline.storage import write_bytes

        write_bytes(self.fs, self.path_of(name), data)
        return self.uri_of(name)

    def read_text(self, name: str) -> str:
        return self.read_bytes(name).decode("utf-8")

    def write_text(self, name: str, text: str) -> str:
        return self.write_bytes(name, text.encode("utf-8"))

    def read_json(self, name: str) -> Any:
        return json.loads(self.read_bytes(name))

    def write_json(self, name: str, value: Any) -> str:
        return self.write_text(name, json.dumps(value, indent=2, default=str) + "\n")


# ---- config.yaml -----------------------------------------------------------------------------------


def write_config(run: RunDir, config: dict, name: str = CONFIG_FILE) -> str:
    """The resolved config (every default filled in) next to the outputs it produced."""
    return run.write_text(name, yaml.safe_dump(config, sort_keys=False))


def read_config(run: RunDir, name: str = CONFIG_FILE) -> dict:
    return yaml.safe_load(run.read_text(name))


def write_run_facts(run: RunDir, facts: dict) -> str:
    """``run.json``: what the driver resolved for the run (job, model shape with its vocab size,
    seq_len, total steps, data), so a report never has to re-derive it."""
    return run.write_json(RUN_FILE, facts)


def read_run_facts(run: RunDir) -> dict:
    return run.read_json(RUN_FILE)


# ---- metrics.jsonl -----------------------------------------------------------------------------------


def read_metrics(run: RunDir) -> list[dict]:
    """All records of a run's ``metrics.jsonl`` (empty when there is none yet)."""
    if not run.has(METRICS_FILE):
        return []
    return [json.loads(line) for line in run.read_text(METRICS_FILE).splitlines() if line.strip()]


class MetricsLog:
    """Rank 0's ``metrics.jsonl``: records are appended in memory and written out by a background
    thread at most every ``flush_interval_s`` (and on ``close``), so a slow or remote store never
    stalls the step loop. On a local disk new lines are appended; object stores cannot append, so
    there a flush rewrites the file. ``flush`` writes synchronously; the loop calls it at each
    checkpoint, so a crash never loses a record its checkpoint covers. A resumed run first drops lines
    past its checkpoint (``truncate_after``: one rewrite) so no step is logged twice."""

    def __init__(self, run: RunDir, *, flush_interval_s: float = 5.0):
        self.run, self.flush_interval_s = run, flush_interval_s
        self.lines = [json.dumps(r) for r in read_metrics(run)]
        self._written = len(self.lines)  # lines already in the file; -1: the file must be rewritten
        self._appendable = isinstance(run.fs, pafs.LocalFileSystem)
        self._lock, self._dirty, self._error = threading.Lock(), threading.Event(), None
        self._write_lock = threading.Lock()  # one writer at a time: the thread, flush or close
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._flush_loop, name="raylm-metrics", daemon=True)
        self._thread.start()

    def records(self) -> list[dict]:
        with self._lock:
            return [json.loads(line) for line in self.lines]

    def truncate_after(self, step: int) -> None:
        with self._lock:
            kept = [line for line in self.lines if json.loads(line).get("step", 0) <= step]
            if len(kept) != len(self.lines):
                self.lines, self._written = kept, -1
        self._dirty.set()

    def append(self, record: dict[str, Any]) -> None:
        if self._error is not None:
            raise RuntimeError(f"writing {self.run.uri_of(METRICS_FILE)} failed: {self._error}") from self._error
        with self._lock:
            self.lines.append(json.dumps(record))
        self._dirty.set()

    def flush(self) -> None:
        """Write every record appended so far, now (retrying transient storage errors)."""
        from data_pipeline.storage import with_retries

        if self._error is not None:
            raise RuntimeError(f"writing {self.run.uri_of(METRICS_FILE)} failed: {self._error}") from self._error
        with_retries(self._write, what=self.run.uri_of(METRICS_FILE))

    def close(self) -> None:
        """Write everything out now (call at the end of the loop); raises if the last write failed."""
        self._closed.set()
        self._dirty.set()
        self._thread.join()
        self._write()

    def _write(self) -> None:
        with self._write_lock:
            self._write_locked()

    def _write_locked(self) -> None:
        with self._lock:
            lines, written = list(self.lines), self._written
        if self._appendable and written >= 0 and self.run.has(METRICS_FILE):
            new = lines[written:]
            if new:
                with self.run.fs.open_append_stream(self.run.path_of(METRICS_FILE)) as f:
                    f.write(("\n".join(new) + "\n").encode("utf-8"))
        else:
            self.run.write_text(METRICS_FILE, "\n".join(lines) + "\n" if lines else "")
        with self._lock:
            if self._written == written:  # no truncation happened meanwhile
                self._written = len(lines)

    def _flush_loop(self) -> None:
        from data_pipeline.storage import with_retries

        while not self._closed.is_set():
            self._dirty.wait()
            if self._closed.is_set():
                return
            self._dirty.clear()
            try:
                with_retries(self._write, what=self.run.uri_of(METRICS_FILE))
            except Exception as err:  # surfaced on the next append or on close
                self._error = err
                return
            self._closed.wait(self.flush_interval_s)


def write_latest_run(family: RunDir, run_uri: str) -> str:
    """Point ``family`` (e.g. runs/shakespeare) at ``run_uri`` (runs/shakespeare-<time>), so configs
    that name the family (fine-tune's ``checkpoint: runs/shakespeare``) find the newest demo run."""
    return family.write_text(LATEST_RUN_FILE, run_uri + "\n")


def read_latest_run(family: RunDir) -> Optional[str]:
    return family.read_text(LATEST_RUN_FILE).strip() if family.has(LATEST_RUN_FILE) else None


# ---- stop_requested ----------------------------------------------------------------------------------


def request_stop(run: RunDir) -> str:
    """Ask a running run to save a checkpoint at its next log interval and end there (a Ray Job stop
    or Ctrl-C loses every step since the last checkpoint); re-running it resumes from that checkpoint.
    ``run`` is a run directory, or a run family (``runs/shakespeare``) whose newest run is meant."""
    if not run.has(RUN_FILE):
        latest = read_latest_run(run)
        run = RunDir.at(latest, run.endpoint_url) if latest else run
        if not latest or not run.has(RUN_FILE):
            raise FileNotFoundError(f"{run.uri} is not a run directory (no {RUN_FILE}): nothing to stop there")
    return run.write_text(STOP_REQUEST_FILE, "stop at the next log interval, after a checkpoint\n")


def stop_requested(run: RunDir) -> bool:
    """Whether ``raylm stop`` asked the run to end. Storage that cannot be read right now (an outage the
    run itself rides out) reads as no request: the loop looks again at its next log interval."""
    try:
        return run.has(STOP_REQUEST_FILE)
    except OSError:
        return False


def clear_stop_request(run: RunDir) -> bool:
    """Remove a stop request; True when there was one."""
    if not run.has(STOP_REQUEST_FILE):
        return False
    run.fs.delete_file(run.path_of(STOP_REQUEST_FILE))
    return True


# ---- sweeps, searches, fine-tunes ---------------------------------------------------------------------


def write_point(sweep: RunDir, key: str, record: dict) -> str:
    """One finished scaling point, written by its trial (reused by a re-run of the sweep)."""
    return sweep.write_json(f"{POINTS_DIR}/{key}.json", record)


def read_point(sweep: RunDir, key: str) -> Optional[dict]:
    name = f"{POINTS_DIR}/{key}.json"
    return sweep.read_json(name) if sweep.has(name) else None
