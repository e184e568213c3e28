"""Experiment trackers (TensorBoard, MLflow, Weights & Biases) fed from rank 0's metrics records.

``train.trackers: [tensorboard, mlflow, wandb]`` (any subset) receive what ``metrics.jsonl`` gets:
each log interval's record (its numeric fields, against ``step``), the resolved config once, and a
final summary. ``Trackers.log`` only puts the record on a queue; one background thread opens the
trackers and writes to them, so a slow import, disk or tracking server never delays a step.

Where each writes, under the run directory:
- ``tensorboard/``: event files (``torch.utils.tensorboard``); view with ``tensorboard --logdir``.
- ``mlflow/``: an MLflow file store, or the server/database in ``MLFLOW_TRACKING_URI`` when set;
  experiment ``MLFLOW_EXPERIMENT_NAME`` (default ``raylm``), one MLflow run per raylm run.
- ``wandb/``: an offline W&B run (``wandb sync`` uploads it); ``WANDB_MODE=online`` logs live.
A remote run directory (s3://, gs://, ...) is written to a local staging directory, which is
copied up every ``sync_interval_s`` and at ``close``, and copied down again when a run resumes.

On resume (``resume_step`` > 0) TensorBoard hides the events past that step that the failed attempt
wrote (``purge_step``); MLflow continues the same run (found by its ``raylm.run_dir`` tag) and keeps
both attempts' values for those steps, as it cannot delete metric points; W&B reuses the run id.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import queue
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Optional, Sequence

TRACKERS = ("tensorboard", "mlflow", "wandb")
# tracker -> (module that must import, the raylm extra that installs it)
_NEEDS = {"tensorboard": ("tensorboard", "tensorboard"), "mlflow": ("mlflow", "mlflow"), "wandb": ("wandb", "wandb")}
# Environment variables a tracker reads on the worker (tracking URI, experiment, W&B mode/project/key):
# the driver forwards those it has so a Ray worker sees the same settings as the shell that started it.
TRACKER_ENV_PREFIXES = ("MLFLOW_", "WANDB_")
SYNC_INTERVAL_S = 300.0
RUN_DIR_TAG = "raylm.run_dir"


class TrackerError(RuntimeError):
    """A tracker cannot be opened or written; the message names the tracker and the fix."""


def check_trackers(names: Sequence[str]) -> None:
    """Raise TrackerError for an unknown or repeated tracker name, or one whose package is missing.

    Cheap (no import of the trackers themselves): the driver can call it before any worker starts.
    """
    for name in names:
        if name not in TRACKERS:
            raise TrackerError(f"train.trackers: unknown tracker {name!r}; allowed: {', '.join(TRACKERS)}")
        module, extra = _NEEDS[name]
        if importlib.util.find_spec(module) is None:
            raise TrackerError(
                f"train.trackers: {name!r} needs the {module!r} package, which is not installed; "
                f"pip install 'raylm[{extra}]' (or drop {name!r} from train.trackers)"
            )
    if len(set(names)) != len(names):
        raise TrackerError(f"train.trackers lists a tracker twice: {list(names)}")


def scalars(record: dict) -> dict[str, float]:
    """The record's numeric fields as floats, less ``step`` (the x axis) and ``start_step``.

    None (e.g. ``mfu`` on CPU) and lists (``optimizer_state_numel_per_rank``) stay in metrics.jsonl only.
    """
    return {
        key: float(value)
        for key, value in record.items()
        if key not in ("step", "start_step") and isinstance(value, (int, float)) and not isinstance(value, bool)
    }


def flatten(tree: dict, prefix: str = "") -> dict[str, str]:
    """A nested config as ``{"train.lr": "0.001", ...}`` (MLflow params are flat strings)."""
    out: dict[str, str] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
    return out


class TensorBoardTracker:
    """Event files under ``<root>/tensorboard`` (``torch.utils.tensorboard``), one set per attempt."""

    def __init__(self, root: Path, config: dict, resume_step: int):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: TensorBoard hides the failed attempt's events at steps > resume_step.
        self.writer = SummaryWriter(
            log_dir=str(root / "tensorboard"), purge_step=resume_step + 1 if resume_step else None
        )
        self.writer.add_text("config", _code_block(config), global_step=resume_step)
        self.last_step = resume_step

    def log(self, record: dict, walltime: float) -> None:
        for key, value in scalars(record).items():
            self.writer.add_scalar(key, value, global_step=record["step"], walltime=walltime)
        self.writer.flush()  # on this thread; else events wait up to 2 min and a crash loses them
        self.last_step = record["step"]

    def summary(self, values: dict) -> None:
        self.writer.add_text("summary", _code_block(values), global_step=self.last_step)

    def close(self) -> None:
        self.writer.close()


class MlflowTracker:
    """One MLflow run per raylm run (tagged with the run directory, so a resume finds it again)."""

    def __init__(self, root: Path, run_name: str, run_dir: str, config: dict, resume_step: int):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            # MLflow 3 keeps its file store in maintenance mode behind this opt-in; a file store needs no
            # server or database, which is what a run directory of plain files wants.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = (root / "mlflow").as_uri()
        self.client = MlflowClient(tracking_uri=uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "raylm")
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
        found = self.client.search_runs([experiment_id], filter_string=f"tags.`{RUN_DIR_TAG}` = '{run_dir}'")
        if found:
            self.run_id = found[0].info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
            had = found[0].data.params
        else:
            self.run_id = self.client.create_run(
                experiment_id, run_name=run_name, tags={RUN_DIR_TAG: run_dir}
            ).info.run_id
            had = {}
        params = flatten(config)
        changed = {k: (had[k], v) for k, v in params.items() if k in had and had[k] != v}
        if changed:  # MLflow refuses to change a logged param; keep the first values and say so
            print(f"[raylm] mlflow: params changed since the run began, kept as first logged: {changed}", flush=True)
        new = [Param(k, v) for k, v in params.items() if k not in had]
        for i in range(0, len(new), 100):  # log_batch takes at most 100 params
            self.client.log_batch(self.run_id, params=new[i : i + 100])
        self.last_step = resume_step

    def log(self, record: dict, walltime: float) -> None:
        from mlflow.entities import Metric

        ms = int(walltime * 1000)
        metrics = [Metric(k, v, ms, record["step"]) for k, v in scalars(record).items()]
        self.client.log_batch(self.run_id, metrics=metrics)
        self.last_step = record["step"]

    def summary(self, values: dict) -> None:
        from mlflow.entities import Metric, RunTag

        ms = int(time.time() * 1000)
        numbers = scalars({k: v for k, v in values.items() if v is not None})
        tags = [RunTag(f"summary/{k}", str(v)) for k, v in values.items() if k not in numbers]
        metrics = [Metric(f"summary/{k}", v, ms, self.last_step) for k, v in numbers.items()]
        self.client.log_batch(self.run_id, metrics=metrics, tags=tags)

    def close(self) -> None:
        self.client.set_terminated(self.run_id, "FINISHED")


class WandbTracker:
    """A W&B run, offline unless WANDB_MODE says otherwise; its id is derived from the run directory."""

    def __init__(self, root: Path, run_name: str, run_dir: str, config: dict, resume_step: int):
        import wandb

        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "raylm"),
            name=run_name,
            id=hashlib.sha1(run_dir.encode()).hexdigest()[:16],
            resume="allow",
            dir=str(root),
            mode=os.environ.get("WANDB_MODE", "offline"),
            config=config,
            # console off: W&B would otherwise wrap the worker's stdout, which Ray already captures.
            settings=wandb.Settings(console="off", silent=True, disable_git=True),
        )
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")  # raylm's step is the x axis, also across resumes

    def log(self, record: dict, walltime: float) -> None:
        self.run.log({**scalars(record), "step": record["step"]})

    def summary(self, values: dict) -> None:
        self.run.summary.update(values)

    def close(self) -> None:
        import wandb

        self.run.finish()
        # finish() can return before W&B's service process has written the run file; teardown waits for
        # it, so nothing is lost when Ray ends the worker process right after training.
        wandb.teardown()


def _code_block(tree: dict) -> str:
    """JSON indented four spaces: TensorBoard's text tab renders it as a code block."""
    return "\n".join("    " + line for line in json.dumps(tree, indent=2, default=str).splitlines())


class Trackers:
    """Rank 0's trackers behind one queue and one thread: ``log`` and ``summary`` never wait on them.

    A tracker that fails stops the others; the error is raised by the next ``log``/``summary``/
    ``close`` call, naming the tracker. ``close`` drains the queue, closes the trackers and copies a
    staged run directory up.
    """

    def __init__(self, names: Sequence[str], open_args: dict, mirror: Optional["_Mirror"], sync_interval_s: float):
        self.names = list(names)
        self.mirror, self.sync_interval_s = mirror, sync_interval_s
        self.error: Optional[TrackerError] = None
        self.closed = False
        self.queue: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._run, args=(open_args,), name="raylm-trackers", daemon=True)
        if self.names:
            self.thread.start()

    def log(self, record: dict) -> None:
        """Queue one metrics record (the dict appended to metrics.jsonl); returns at once."""
        self._put(("log", dict(record), time.time()))

    def summary(self, values: dict) -> None:
        """Queue the run's final summary (e.g. final_step, final_loss, final_val_loss, tokens, wall_s)."""
        self._put(("summary", dict(values), time.time()))

    def close(self) -> None:
        """Write everything queued, close the trackers, copy a staged directory up; raise any failure."""
        if self.closed:
            return
        self.closed = True
        if self.names:
            self.queue.put(None)
            self.thread.join()
        if self.error:
            raise self.error

    def _put(self, item: tuple) -> None:
        if self.error:
            raise self.error
        if self.closed:
            raise TrackerError("trackers are closed; log before close()")
        if self.names:
            self.queue.put(item)

    def _run(self, open_args: dict) -> None:
        opened: dict[str, Any] = {}
        current = self.names[0]
        try:
            for name in self.names:
                current = name
                opened[name] = _open_one(name, **open_args)
            last_sync = time.monotonic()
            while (item := self.queue.get()) is not None:
                kind, values, walltime = item
                for name, tracker in opened.items():
                    current = name
                    if kind == "log":
                        tracker.log(values, walltime)
                    else:
                        tracker.summary(values)
                if self.mirror and time.monotonic() - last_sync > self.sync_interval_s:
                    current = "sync"
                    self.mirror.push()
                    last_sync = time.monotonic()
            for name, tracker in opened.items():
                current = name
                tracker.close()
            if self.mirror:
                current = "sync"
                self.mirror.push()
        except Exception as err:  # re-raised in the training loop by the next call
            where = (
                f"copying {self.mirror.local} to {open_args['run_dir']}"
                if current == "sync"
                else f"tracker {current!r}"
            )
            self.error = TrackerError(f"train.trackers: {where} failed: {type(err).__name__}: {err}")
            self.error.__cause__ = err


def _open_one(name: str, *, root: Path, run_name: str, run_dir: str, config: dict, resume_step: int):
    if name == "tensorboard":
        return TensorBoardTracker(root, config, resume_step)
    if name == "mlflow":
        return MlflowTracker(root, run_name, run_dir, config, resume_step)
    return WandbTracker(root, run_name, run_dir, config, resume_step)


class _Mirror:
    """A local staging directory for a remote run directory: pulled once at open, pushed at sync/close.

    Only files whose size or mtime changed since the last push are uploaded; folders are created
    remotely too (object stores keep them as markers); symlinks (W&B's ``latest-run``) are skipped.
    """

    def __init__(self, fs, remote: str, local: Path, subdirs: Sequence[str]):
        self.fs, self.remote, self.local, self.subdirs = fs, remote, local, list(subdirs)
        self.pushed: dict[str, tuple[int, int]] = {}  # local file -> (size, mtime) last copied
        self.made: set[str] = set()  # local folders already created remotely

    def pull(self) -> None:
        import pyarrow.fs as pafs

        for sub in self.subdirs:
            selector = pafs.FileSelector(f"{self.remote}/{sub}", recursive=True, allow_not_found=True)
            for info in self.fs.get_file_info(selector):
                target = self.local / info.path[len(self.remote) + 1 :]
                if info.type == pafs.FileType.Directory:
                    target.mkdir(parents=True, exist_ok=True)
                    self.made.add(str(target))
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with self.fs.open_input_stream(info.path) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                stat = target.stat()
                self.pushed[str(target)] = (stat.st_size, stat.st_mtime_ns)

    def push(self) -> None:
        for sub in self.subdirs:
            for dirpath, _, files in os.walk(self.local / sub):
                if dirpath not in self.made:  # empty folders matter (an MLflow run needs its artifacts/)
                    self.fs.create_dir(f"{self.remote}/{os.path.relpath(dirpath, self.local)}", recursive=True)
                    self.made.add(dirpath)
                for name in files:
                    path = os.path.join(dirpath, name)
                    if os.path.islink(path):
                        continue
                    stat = os.stat(path)
                    if self.pushed.get(path) == (stat.st_size, stat.st_mtime_ns):
                        continue
                    rel = os.path.relpath(path, self.local).replace(os.sep, "/")
                    with open(path, "rb") as src, self.fs.open_output_stream(f"{self.remote}/{rel}") as dst:
                        shutil.copyfileobj(src, dst)
                    self.pushed[path] = (stat.st_size, stat.st_mtime_ns)


def open_trackers(
    names: Sequence[str],
    *,
    run_dir: str,
    run_name: str,
    config: dict,
    resume_step: int = 0,
    endpoint_url: Optional[str] = None,
    sync_interval_s: float = SYNC_INTERVAL_S,
) -> Trackers:
    """Start the trackers in ``names`` (a subset of TRACKERS; empty: a no-op Trackers) for one run.

    ``run_dir`` is the run directory (local path or URI, ``endpoint_url`` for s3:// on MinIO/moto),
    ``config`` the resolved config (nested dict), ``resume_step`` the step the run restarts from (0:
    a new run). Call from rank 0 only. Opening happens in the background; the package check is here.
    """
    check_trackers(names)
    if not names:
        return Trackers([], {}, None, sync_interval_s)
    import pyarrow.fs as pafs

    from data_pipeline.storage import filesystem_for

    fs, path = filesystem_for(run_dir, endpoint_url)
    mirror = None
    if isinstance(fs, pafs.LocalFileSystem):
        root = Path(path)
    else:
        root = Path(tempfile.gettempdir()) / "raylm-trackers" / hashlib.sha1(run_dir.encode()).hexdigest()[:12]
        shutil.rmtree(root, ignore_errors=True)  # the remote copy is the truth; a stale local one is not
        root.mkdir(parents=True)
        mirror = _Mirror(fs, path, root, subdirs=names)  # each tracker writes <root>/<its name>/
        if resume_step > 0:
            mirror.pull()
        print(
            f"[raylm] trackers write to {root}; copied to {run_dir} every {sync_interval_s:.0f} s and at the end",
            flush=True,
        )
    open_args = dict(root=root, run_name=run_name, run_dir=run_dir, config=config, resume_step=resume_step)
    return Trackers(names, open_args, mirror, sync_interval_s)
