"""Differentially private pretraining (DP-SGD) with Opacus, at ZeRO stage 0: why and how it fits.

A model trained on private text can repeat it; DP-SGD bounds what any one training row can change,
with a guarantee (epsilon, delta) an accountant tracks. Per step: rows come as a Poisson sample (each
train row in with probability q = global_batch_size / rows; ``data_pipeline.loader.poisson_rank_batches``),
Opacus' hooks give every row its own gradient, each is clipped to ``max_grad_norm``, and Gaussian noise
of ``noise_multiplier x max_grad_norm`` is added to their sum, which is divided by the expected batch.

What raylm adds around Opacus: the LM head's loss runs as plain logits + cross-entropy (the fused
chunked loss of ``model.loss`` hides the head from Opacus' hooks) with a grad sampler for the padded
head; learned positions are looked up per row; a rank's rows of a step (any number, none included)
are cut into micro-batches of at most micro_batch_size whose clipped gradients add up, then the step
adds noise on rank 0, all-reduces (``DistributedDPOptimizer``) and steps AdamW. torch DDP is not used:
its all-reduce would run on unclipped gradients. The RDP accountant's history is checkpointed, so
epsilon keeps counting across a resume.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from contextlib import nullcontext
from typing import Iterator, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from orchestration.train.config import TrainConfig
from orchestration.train.ddp import AUTOCAST_DTYPES, STATE_FILE
from orchestration.train.plan import PrivacyPlan


def resolve_privacy(train: TrainConfig, train_rows: int, total_steps: int) -> PrivacyPlan:
    """DP-SGD's parameters for a run of ``total_steps`` on ``train_rows`` rows: the sample rate
    global_batch_size / train_rows and the noise (given, or the least that keeps epsilon at the last
    step within train.dp.target_epsilon, from Opacus' RDP accountant). Raises ValueError naming the key."""
    from opacus.accountants import RDPAccountant
    from opacus.accountants.utils import get_noise_multiplier

    dp = train.dp
    if train.global_batch_size > train_rows:
        raise ValueError(
            f"train.global_batch_size ({train.global_batch_size}) is the expected Poisson batch of DP-SGD; it must "
            f"be <= the {train_rows} train rows: lower it"
        )
    if dp.delta >= 1.0 / train_rows:
        suggested = 10 ** math.floor(math.log10(0.1 / train_rows))
        raise ValueError(
            f"train.dp.delta ({dp.delta:g}) must be < 1 / train rows = {1.0 / train_rows:.3g} (a larger delta "
            f"allows leaking a whole row outright); e.g. train.dp.delta={suggested:g}"
        )
    rate = train.global_batch_size / train_rows
    noise = dp.noise_multiplier
    if noise is None:
        try:
            noise = get_noise_multiplier(
                target_epsilon=dp.target_epsilon, target_delta=dp.delta, sample_rate=rate, steps=total_steps
            )
        except ValueError as err:
            raise ValueError(f"train.dp.target_epsilon={dp.target_epsilon}: {err} Raise it") from None
    accountant = RDPAccountant()
    accountant.history = [(noise, rate, total_steps)]
    return PrivacyPlan(
        noise_multiplier=float(noise),
        sample_rate=rate,
        delta=dp.delta,
        max_grad_norm=dp.max_grad_norm,
        train_rows=train_rows,
        expected_epsilon=float(accountant.get_epsilon(delta=dp.delta)),
    )


def register_head_sampler() -> None:
    """Teach Opacus the LM head (an nn.Linear subclass Opacus would hand to functorch): the Linear
    per-sample gradient, zero-padded over the vocabulary's padding rows the logits leave out."""
    from opacus.grad_sample import GradSampleModule

    from model.loss import LMHead

    if LMHead in GradSampleModule.GRAD_SAMPLERS:
        return

    def head_grad_sample(layer: LMHead, activations: list[torch.Tensor], backprops: torch.Tensor) -> dict:
        inputs = activations[0].to(backprops.dtype) * layer.output_mult  # the head multiplies its input (μP)
        grad = torch.einsum("n...i,n...j->nij", backprops, inputs)
        missing = layer.weight.size(0) - grad.size(1)
        return {layer.weight: F.pad(grad, (0, 0, 0, missing)) if missing else grad}

    GradSampleModule.GRAD_SAMPLERS[LMHead] = head_grad_sample


class DPEngine:
    """One rank's model under Opacus' hooks, DP AdamW and the RDP accountant, with the engine surface the
    loop and checkpoints use (``engine(x)``, ``optimizer``, ``get_global_grad_norm``, ``save_checkpoint``/
    ``load_checkpoint`` in DDPEngine's file layout). ``backward`` + ``accumulate`` per micro-batch,
    ``step`` once per optimizer step."""

    def __init__(
        self,
        module: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        train: TrainConfig,
        privacy: PrivacyPlan,
        device,
    ):
        from opacus import GradSampleModule
        from opacus.accountants import RDPAccountant
        from opacus.distributed import DifferentiallyPrivateDistributedDataParallel
        from opacus.optimizers import DistributedDPOptimizer, DPOptimizer

        register_head_sampler()
        # the token embedding's input is integer ids, so its hook fires on outputs alone, as Opacus means
        warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed")
        self.module, self.device, self.privacy = module, torch.device(device), privacy
        if hasattr(module, "batched_positions"):
            module.batched_positions = True
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.rank = dist.get_rank() if distributed else 0
        world_size = dist.get_world_size() if distributed else 1
        # DPDDP only broadcasts rank 0's weights; the gradients are all-reduced by the optimizer after noising
        wrapped = DifferentiallyPrivateDistributedDataParallel(module) if distributed else module
        self.grad_sample_module = GradSampleModule(wrapped, loss_reduction="mean")
        dp_optimizer = DistributedDPOptimizer if distributed else DPOptimizer
        # per rank: ranks' gradients are averaged, so the sum is divided by the expected global batch
        self.optimizer = dp_optimizer(
            optimizer,
            noise_multiplier=privacy.noise_multiplier,
            max_grad_norm=privacy.max_grad_norm,
            expected_batch_size=train.global_batch_size // world_size,
            loss_reduction="mean",
            # noise from the OS's entropy, not from train.seed, which the run's config and checkpoints publish
            generator=torch.Generator(self.device).manual_seed(int.from_bytes(os.urandom(8), "little")),
        )
        self.accountant = RDPAccountant()
        self.optimizer.attach_step_hook(self.accountant.get_optimizer_hook_fn(sample_rate=privacy.sample_rate))
        dtype = AUTOCAST_DTYPES.get(train.precision)
        self.autocast = torch.autocast(self.device.type, dtype=dtype) if dtype else nullcontext()
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.grad_norm: Optional[torch.Tensor] = None

    def __call__(self, *args, **kwargs):
        with self.autocast:
            return self.grad_sample_module(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        """Per-sample gradients of a micro-batch's loss, the mean over its rows of each row's mean."""
        loss.backward()

    def accumulate(self) -> None:
        """Clip the micro-batch's per-sample gradients and add them to the step's sum (Opacus' skipped step)."""
        self.optimizer.signal_skip_step(do_skip=True)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def step(self) -> None:
        """End the step: noise on rank 0, all-reduce, AdamW, one accountant step. A rank whose sample
        was empty adds zero gradients (an empty batch to Opacus) but takes part in the all-reduce."""
        for p in self.params:
            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
        self.optimizer.step()
        self.grad_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in self.params]))
        self.optimizer.zero_grad(set_to_none=True)

    def epsilon(self) -> float:
        """Epsilon spent so far at the run's delta (RDP accountant over the steps taken)."""
        return float(self.accountant.get_epsilon(delta=self.privacy.delta)) if self.accountant.history else 0.0

    def privacy_record(self, window) -> dict:
        """The metrics record's privacy fields, and its train loss: the mean loss of the rows every rank
        drew since the last record (``window``: the loop's; the batch size varies, so the loop's mean over
        micro-batches would not be it). A collective."""
        sums = torch.stack([window.loss_sum.float(), torch.tensor(float(window.rows_sampled), device=self.device)])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(sums)
        loss_sum, rows = sums.tolist()
        return {
            "loss": loss_sum / rows if rows else float("nan"),
            "dp_epsilon": self.epsilon(),
            "dp_delta": self.privacy.delta,
            "dp_noise_multiplier": self.privacy.noise_multiplier,
            "dp_sample_rate": self.privacy.sample_rate,
            "dp_max_grad_norm": self.privacy.max_grad_norm,
            "dp_steps": sum(steps for _, _, steps in self.accountant.history),
            "dp_rows_sampled": int(rows),
        }

    def get_global_grad_norm(self) -> Optional[torch.Tensor]:
        """The norm of the last step's private gradient (clipped, noised, averaged)."""
        return self.grad_norm

    def train(self) -> None:
        self.module.train()

    def eval(self) -> None:
        self.module.eval()

    def save_checkpoint(self, save_dir: str, tag: str) -> None:
        """Rank 0 writes DDPEngine's file (weights, AdamW) plus the accountant's history."""
        if self.rank != 0:
            return
        os.makedirs(os.path.join(save_dir, tag), exist_ok=True)
        state = {
            "module": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "accountant": self.accountant.state_dict(),
        }
        torch.save(state, os.path.join(save_dir, tag, STATE_FILE))

    def load_checkpoint(
        self, load_dir: str, tag: str, load_optimizer_states: bool = True, load_lr_scheduler_states: bool = False
    ) -> tuple[Optional[str], dict]:
        """(path, {}) after loading what ``save_checkpoint`` wrote, or (None, {}) when there is none.
        A checkpoint trained without DP has no privacy history to continue: refused."""
        path = os.path.join(load_dir, tag, STATE_FILE)
        if not os.path.isfile(path):
            return None, {}
        state = torch.load(path, map_location=self.device, weights_only=False)
        if "accountant" not in state:
            raise ValueError(
                f"{path} was trained without train.dp: its steps spent privacy nobody accounted for, so no "
                "epsilon can be stated for a DP run from it; start the DP run from scratch"
            )
        self.module.load_state_dict(state["module"])
        if load_optimizer_states:
            self.optimizer.load_state_dict(state["optimizer"])
        self.accountant.load_state_dict(state["accountant"])
        return path, {}


def dp_lm_forward(engine, batch: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``task.lm_forward`` for DP-SGD. Training: logits, then each row's mean token loss, then their mean
    (Opacus' ``loss_reduction="mean"`` is a mean over rows; every train row has seq_len targets). The
    logits of the micro-batch are held whole, unlike the fused loss's chunks. Without gradients (eval)
    the fused loss of ``lm_forward`` runs as usual."""
    from orchestration.train.task import lm_forward, to_device

    if not torch.is_grad_enabled():
        return lm_forward(engine, batch, device)
    tokens = to_device(batch["tokens"], device)
    targets = tokens[:, 1:]
    logits, _ = engine(tokens[:, :-1])
    per_token = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none", ignore_index=-1)
    loss = per_token.view(tokens.size(0), -1).mean(dim=1).mean()
    return loss, torch.tensor(float(targets.numel()), device=device), torch.zeros((), device=device)


def dp_optimizer_step(
    engine: DPEngine,
    train: TrainConfig,
    step: int,
    total_steps: int,
    batches: Iterator[dict],
    window,
    task,
    device,
    phases=None,
) -> float:
    """``loop.optimizer_step`` for DP-SGD: this rank's Poisson rows of the step (one item of ``batches``,
    possibly empty) in micro-batches of at most micro_batch_size, each clipped per sample into the step's
    sum, then one noised step. ``window.loss_sum`` gets the rows' summed loss, ``window.rows_sampled`` their
    count (``DPEngine.privacy_record`` makes the record's loss of them)."""
    from orchestration.train.engine import set_lr
    from orchestration.train.schedule import lr_for

    lr = lr_for(train, step, total_steps)
    set_lr(engine.optimizer, lr)
    end = phases.end if phases is not None else lambda phase: None
    t0 = time.perf_counter()
    rows = next(batches)["tokens"]
    window.data_wait_s += time.perf_counter() - t0
    window.rows_sampled += len(rows)
    for start in range(0, len(rows), train.micro_batch_size):
        micro = rows[start : start + train.micro_batch_size]
        loss, _, _ = task.forward(engine, {"tokens": micro}, device)
        end("forward")
        engine.backward(loss)
        end("backward")
        engine.accumulate()
        window.loss_sum += loss.detach().float() * len(micro)
    engine.step()
    end("optimizer_step")
    return lr
