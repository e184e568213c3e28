"""`raylm mup-check`: the coordinate check of μP (Yang et al., Tensor Programs V, Fig. 5; the ``mup``
package's ``get_coord_data``): do activations keep their size as the model widens?

widths x {sp, mup} x seeds -> a small GPT (fixed n_head, so head_dim grows with width) trained a few
AdamW steps (``param_groups``' lr_scale applied) at one LR for every width, on byte-level Shakespeare ->
at every step, per layer, the mean |x| over coordinates (mup's ``l1``), averaged over seeds -> per layer
and step the least-squares slope of log(scale) against log(width) -> mup_check.json; its report is
``report.mup_check``.

Step t records the forward of the t-th training step, i.e. after t-1 updates (step 1 is at init), as
``get_coord_data`` does. A slope near 0 means that layer's activations do not change size with width.
Under sp hidden layers grow with width: already at init (GPT-2's fixed std 0.02 for every matrix makes a
matmul's output grow as sqrt(fan_in)), and faster once the width-independent LR's updates add up; under μP
(``model.mup``) they should stay flat. The logits under μP start at
1/sqrt(width) (the 1/m readout on an O(1)-init tied embedding) and reach O(1) once the first updates
dominate: which is why the summary reads the last step. Single process, no Ray.
"""

from __future__ import annotations

import datetime
import time
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np

PARAMETRIZATIONS = ("sp", "mup")


class MupCheckError(ValueError):
    """Options the coordinate check cannot run with, saying which and why."""


@dataclass
class MupCheckConfig:
    """The check's widths, training and model shape; the defaults take about 40 s on 2 idle CPU cores."""

    widths: tuple[int, ...] = (64, 128, 256, 512, 1024)
    base_width: Optional[int] = None  # μP's mup_base_width; None: the smallest width
    steps: int = 5
    lr: float = 1e-2  # one LR at every width: large enough that sp's growth shows in a few steps
    seeds: int = 3  # each seed draws its own init and batches; scales are averaged over seeds
    n_layer: int = 2
    n_head: int = 4
    block_size: int = 64
    batch_size: int = 8
    device: str = "cpu"
    corpus_file: str = "hamlet_gut.txt"  # a play of the embedded corpus, read as bytes (vocab 256)

    def __post_init__(self) -> None:
        self.widths = tuple(sorted(set(self.widths)))
        if len(self.widths) < 2:
            raise MupCheckError(f"--widths needs at least two different widths to fit a slope, got {self.widths}")
        if odd := [w for w in self.widths if w % self.n_head]:
            raise MupCheckError(f"every width must be a multiple of n_head={self.n_head}; {odd} are not")
        if self.base_width is None:
            self.base_width = self.widths[0]
        if self.base_width < 1:
            raise MupCheckError(f"--base-width must be >= 1, got {self.base_width}")


def layer_names(n_layer: int) -> list[str]:
    """The recorded activations, in forward order."""
    blocks = [f"block{i}.{part}" for i in range(n_layer) for part in ("attn", "mlp", "out")]
    return ["embedding", *blocks, "ln_f", "logits"]


def record_scales(model, scales: dict[str, list[float]]) -> list:
    """Forward hooks appending each recorded layer's mean |x| to ``scales[name]`` at every forward;
    returns the handles. The logits are the head applied to ln_f's output (a training forward's head
    returns the loss, never the logits)."""
    import torch

    def hook(name: str):
        def record(module, inputs, output) -> None:
            with torch.no_grad():
                scales[name].append(output.abs().mean().item())
                if name == "ln_f":
                    scales["logits"].append(model.lm_head(output).abs().mean().item())

        return record

    modules = {"embedding": model.transformer.drop, "ln_f": model.transformer.ln_f}
    for i, block in enumerate(model.transformer.h):
        modules |= {f"block{i}.attn": block.attn, f"block{i}.mlp": block.mlp, f"block{i}.out": block}
    return [module.register_forward_hook(hook(name)) for name, module in modules.items()]


def train_and_record(cfg: MupCheckConfig, parametrization: str, width: int, seed: int, data: np.ndarray) -> dict:
    """One model trained ``cfg.steps`` AdamW steps on random windows of ``data`` (starts drawn from
    ``seed``, so every width and parametrization of a seed reads the same batches) -> {"scales": {layer:
    [mean |x| per step]}, "loss": [per step]}."""
    import torch

    from model.config import ModelConfig
    from model.gpt import GPT
    from orchestration.train.engine import param_groups, set_lr

    model_cfg = ModelConfig(
        vocab_size=256,
        block_size=cfg.block_size,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        n_embd=width,
        parametrization=parametrization,
        mup_base_width=cfg.base_width,
    )
    torch.manual_seed(seed)
    model = GPT(model_cfg).to(cfg.device)
    # no weight decay: the check measures the parametrization's updates alone
    optimizer = torch.optim.AdamW(param_groups(model, weight_decay=0.0), lr=cfg.lr, betas=(0.9, 0.95))
    set_lr(optimizer, cfg.lr)
    scales: dict[str, list[float]] = {name: [] for name in layer_names(cfg.n_layer)}
    handles = record_scales(model, scales)
    rng = np.random.default_rng(seed)
    offsets = np.arange(cfg.block_size + 1)
    losses = []
    for _ in range(cfg.steps):
        starts = rng.integers(0, len(data) - cfg.block_size - 1, cfg.batch_size)
        batch = torch.from_numpy(data[starts[:, None] + offsets].astype(np.int64)).to(cfg.device)
        _, loss = model(batch[:, :-1], batch[:, 1:])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    for handle in handles:
        handle.remove()
    return {"scales": scales, "loss": losses}


def width_slopes(widths: tuple[int, ...], scales: np.ndarray) -> np.ndarray:
    """Least-squares slope of log(scale) against log(width); ``scales`` (..., len(widths)) -> (...)."""
    x = np.log(np.asarray(widths, dtype=float))
    y = np.log(scales)
    x_centered = x - x.mean()
    return (y - y.mean(axis=-1, keepdims=True)) @ x_centered / (x_centered @ x_centered)


def coordinate_check(cfg: MupCheckConfig, parametrization: str, data: np.ndarray) -> dict:
    """Every width and seed of one parametrization -> {"scales": {layer: [[seed-mean per width] per step]},
    "slopes": {layer: [per step]}, "loss": [[seed-mean per width] per step], "max_abs_slope",
    "max_abs_slope_layer"} (the last two over layers at the last step)."""
    names = layer_names(cfg.n_layer)
    runs = [[train_and_record(cfg, parametrization, w, seed, data) for seed in range(cfg.seeds)] for w in cfg.widths]
    # (layer, step, width): the mean over seeds, as the mup package's plots average them
    scales = np.array([[np.mean([r["scales"][name] for r in by_seed], axis=0) for by_seed in runs] for name in names])
    scales = scales.transpose(0, 2, 1)
    loss = np.array([np.mean([r["loss"] for r in by_seed], axis=0) for by_seed in runs]).T
    if not np.isfinite(scales).all() or not np.isfinite(loss).all():
        raise MupCheckError(
            f"{parametrization}: an activation or the loss is not finite at lr={cfg.lr}; lower --lr or --steps"
        )
    slopes = width_slopes(cfg.widths, scales)
    last = np.abs(slopes[:, -1])
    return {
        "scales": {name: scales[i].tolist() for i, name in enumerate(names)},
        "slopes": {name: slopes[i].tolist() for i, name in enumerate(names)},
        "loss": loss.tolist(),
        "max_abs_slope": float(last.max()),
        "max_abs_slope_layer": names[int(last.argmax())],
    }


def corpus_bytes(cfg: MupCheckConfig) -> np.ndarray:
    """The play ``cfg.corpus_file`` of the embedded corpus as byte ids (a byte vocabulary needs no tokenizer)."""
    from data_pipeline.storage import DataSourceError, embedded_corpus_dir

    path = embedded_corpus_dir() / cfg.corpus_file
    if not path.is_file():
        raise DataSourceError(f"{path}: no such play in the embedded corpus")
    return np.frombuffer(path.read_bytes(), dtype=np.uint8)


def run_mup_check(cfg: MupCheckConfig, out: str) -> dict:
    """Run the coordinate check of ``cfg`` and write ``out``/mup_check.json; returns what it holds."""
    from orchestration.artifacts import MUP_CHECK_FILE, RunDir

    started = time.perf_counter()
    data = corpus_bytes(cfg)
    checks = {}
    for parametrization in PARAMETRIZATIONS:
        checks[parametrization] = coordinate_check(cfg, parametrization, data)
        print(
            f"[mup-check] {parametrization}: max |slope| {checks[parametrization]['max_abs_slope']:.3f} "
            f"({checks[parametrization]['max_abs_slope_layer']}) at step {cfg.steps}",
            flush=True,
        )
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
        "config": asdict(cfg),
        "widths": list(cfg.widths),
        "steps": cfg.steps,
        "lr": cfg.lr,
        "layers": layer_names(cfg.n_layer),
        "definitions": {
            "scale": "mean |x| over every coordinate of a layer's output (batch, position, feature), seed-averaged",
            "step": "step t is the forward of training step t, after t-1 AdamW updates (step 1: at init)",
            "slope": "least-squares slope of log(scale) against log(width), per layer and step",
            "max_abs_slope": "the largest |slope| over layers at the last step",
        },
        "sp_max_abs_slope": checks["sp"]["max_abs_slope"],
        "mup_max_abs_slope": checks["mup"]["max_abs_slope"],
        "parametrizations": checks,
        "wall_s": time.perf_counter() - started,
    }
    RunDir.at(out).write_json(MUP_CHECK_FILE, result)
    return result
