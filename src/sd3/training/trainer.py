"""Training an SD3 MMDiT with the rectified-flow objective (Esser et al. 2024): the loop.

One step: take the global batch for this step (a seeded permutation of the dataset per epoch),
draw noise, u (-> sigma) and the text-encoder dropout for every sample of it from a generator
seeded by (seed, step), keep this process's slice, compute `flow_loss` under optional bf16 autocast,
and take an AdamW step with gradient clipping, then update the EMA. Since all randomness is a
function of (seed, step, sample), `resume` continues exactly, and N data-parallel processes
(torchrun, DDP) produce the weights one process would with the same global batch.

Out folder: `checkpoint.safetensors` (trainable weights, EMA, AdamW state; step and config as JSON
metadata; replaced atomically every `checkpoint_every` steps and at the end or on Ctrl-C) and
`log.jsonl` (one line of strict JSON per step: loss, lr, grad norm, images/s). A step whose loss
or gradient is not finite raises `Diverged` before it changes the weights, and a checkpoint is
never written with weights that are not finite: the last one written stays the last good one.
"""

import json
import math
import os
import signal
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, fields
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

from sd3.kernels.hardware import warn_if_bf16_is_emulated
from sd3.models.controlnet import ControlNet
from sd3.models.mmdit import MMDiT
from sd3.pipeline import MAX_SEED
from sd3.text import T5_MIN_LENGTH, TextEncoders

from . import sharded
from .checkpoint import load_checkpoint, save_checkpoint
from .conditioning import TextCache, embed, t5_length_for, tokenize, truncation_report
from .controlnet import controlled, controlnet_from_base
from .data import check_pairs
from .flow import TimestepSampling, flow_loss
from .lora import DEFAULT_TARGETS, add_lora, lora_weights

CHECKPOINT = "checkpoint.safetensors"
LOG = "log.jsonl"
TEXT_CACHE_BYTES = 8 * 2**30  # beyond this, frozen text encoders run every step instead
SAME_SIGNAL_S = 1.0  # a signal repeated within this many seconds asks the same (`_catch_interrupt`)
SEEDS = 2**64  # torch.Generator seeds: (seed, step) and (seed, epoch) map into them modulo this


class Diverged(RuntimeError):
    """Training stopped because the loss, the gradient or the weights stopped being finite."""


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 8  # global batch: split over the data-parallel processes
    lr: float = 1e-4
    lr_schedule: str = "constant"  # or "cosine" (to 0 at `steps`); both after a linear warmup
    warmup_steps: int = 0
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    timestep_sampling: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    shift: float = 1.0
    ema_decay: float = 0.999  # 0 turns the EMA off
    grad_clip: float = 1.0  # max global gradient norm; 0 turns clipping off
    text_dropout: float = 0.1  # per encoder and sample (the SD3 paper used 0.464)
    bf16: bool = False  # bf16 autocast; weights and optimizer state stay float32
    grad_checkpointing: bool = False
    shard: bool = False  # FSDP2 over the trained networks (`sharded`), activation checkpointing
    compile: bool = False  # torch.compile the loss (forward and backward); same weights
    train_text_encoders: bool = False
    text_encoder_lr: float | None = None  # peak lr of the text encoders (None: lr), same schedule
    lora_rank: int = 0  # > 0: train LoRA adapters only
    lora_alpha: float | None = None  # None: alpha = rank
    lora_targets: tuple[str, ...] = DEFAULT_TARGETS
    # > 0: train a ControlNet of this many blocks on the examples' control latents, the MMDiT
    # frozen (`sd3.training.controlnet`)
    controlnet_blocks: int = 0
    checkpoint_every: int = 500
    seed: int = 0
    # examples 2k and 2k + 1 form a pair (e.g. a scene and its mirror, `ShapesDataset`): shuffled
    # together into one batch, with the same noise, timestep and text dropout
    paired: bool = False
    # > 0: the pairs' loss is `sd3.shapes.objective.pair_contrast_loss` of this weight
    pair_contrast: float = 0.0

    def __post_init__(self):
        self.adam_betas = tuple(self.adam_betas)
        self.lora_targets = tuple(self.lora_targets)
        whole = {"steps": 1, "batch_size": 1, "checkpoint_every": 1, "warmup_steps": 0,
                 "lora_rank": 0, "controlnet_blocks": 0, "seed": 0}  # fmt: skip
        for name, low in whole.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be a whole number, got {value!r}")
            if value < low:
                raise ValueError(f"{name} must be >= {low}, got {value}")
        if self.seed > MAX_SEED:
            raise ValueError(f"seed must be <= 2**63 - 1, got {self.seed}")
        numbers = ["lr", "weight_decay", "logit_mean", "logit_std", "mode_scale", "shift",
                   "ema_decay", "grad_clip", "text_dropout", "pair_contrast"]  # fmt: skip
        numbers += [n for n in ("text_encoder_lr", "lora_alpha") if getattr(self, n) is not None]
        for name, value in [(n, getattr(self, n)) for n in numbers] + [
            (f"adam_betas[{i}]", b) for i, b in enumerate(self.adam_betas)
        ]:
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"{name} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value}")
        for name in ("weight_decay", "grad_clip"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.lora_alpha is not None and not self.lora_alpha > 0:
            raise ValueError(f"lora_alpha must be > 0, got {self.lora_alpha}")
        if len(self.adam_betas) != 2 or not all(0 <= b < 1 for b in self.adam_betas):
            raise ValueError(f"adam_betas must be two numbers in [0, 1), got {self.adam_betas}")
        if self.text_encoder_lr is not None:
            if not self.text_encoder_lr > 0:
                raise ValueError(f"text_encoder_lr must be > 0, got {self.text_encoder_lr}")
            if not self.train_text_encoders:
                raise ValueError("text_encoder_lr needs train_text_encoders (they are frozen)")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(
                f"lr_schedule must be 'constant' or 'cosine', got {self.lr_schedule!r}"
            )
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if not 0 <= self.text_dropout <= 1:
            raise ValueError(f"text_dropout must be in [0, 1], got {self.text_dropout}")
        if self.paired:
            check_pairs("paired examples need", {"batch_size": self.batch_size})
        if self.pair_contrast < 0 or (self.pair_contrast and not self.paired):
            raise ValueError(
                f"pair_contrast must be >= 0 and needs paired, got {self.pair_contrast}"
            )
        if self.shard and (self.train_text_encoders or self.compile):
            raise ValueError(
                "shard trains eager, with the text encoders frozen: not with train_text_encoders "
                "or compile"
            )
        if self.lora_rank and self.train_text_encoders:
            raise ValueError("LoRA training (lora_rank > 0) keeps the text encoders frozen")
        if self.controlnet_blocks and (self.lora_rank or self.train_text_encoders):
            raise ValueError(
                "ControlNet training (controlnet_blocks > 0) keeps the MMDiT and the text encoders "
                "frozen: no lora_rank or train_text_encoders with it"
            )
        self.sampling()  # validates the timestep sampling and shift

    def sampling(self) -> TimestepSampling:
        return TimestepSampling(
            self.timestep_sampling, self.logit_mean, self.logit_std, self.mode_scale, self.shift
        )

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def enable_gradient_checkpointing(mmdit: MMDiT) -> None:
    """Recompute each joint block's activations in the backward pass instead of storing them.
    The blocks' `forward` is replaced per instance, so parameter names stay as they are."""
    for block in mmdit.joint_blocks:
        if not getattr(block, "checkpointed", False):
            inner = block.forward
            block.forward = lambda *args, f=inner: checkpoint(f, *args, use_reentrant=False)
            block.checkpointed = True


class FlowObjective(nn.Module):
    """The trainable networks and the loss as one module (what DDP wraps). With trainable text
    encoders the prompts are encoded here, with autograd; otherwise (context, pooled) come cached.
    `loss` has `flow_loss`'s signature (an experiment may weight the error otherwise). With a
    `controlnet`, the velocity is the MMDiT's with the ControlNet's residuals for each example's
    control latent (`controlnet.controlled`)."""

    def __init__(
        self,
        mmdit: MMDiT,
        text_encoders: TextEncoders | None = None,
        loss: Callable[..., Tensor] = flow_loss,
        controlnet: ControlNet | None = None,
    ):
        super().__init__()
        self.mmdit = mmdit
        self.text_encoders = text_encoders
        self.loss = loss
        self.controlnet = controlnet

    def forward(
        self,
        x0: Tensor,
        noise: Tensor,
        sigma: Tensor,
        context: Tensor | None = None,
        pooled: Tensor | None = None,
        l_ids: Tensor | None = None,
        g_ids: Tensor | None = None,
        t5_ids: Tensor | None = None,
        t5_length: int = T5_MIN_LENGTH,
        control: Tensor | None = None,
    ) -> Tensor:
        if l_ids is not None:
            context, pooled = embed(self.text_encoders, l_ids, g_ids, t5_ids, t5_length)
        model = self.mmdit
        if self.controlnet is not None:
            model = controlled(self.mmdit, self.controlnet, control)
        return self.loss(model, x0, noise, sigma, context, pooled)


class Trainer:
    """Trains `mmdit` (and optionally the text encoders, or LoRA adapters, or a ControlNet on
    `controls`, the control latents of the examples) on VAE latents with captions. Construct it in
    every process of a torchrun job after `init_process_group`."""

    def __init__(
        self,
        config: TrainConfig,
        mmdit: MMDiT,
        text_encoders: TextEncoders,
        latents: Tensor,
        captions: list[str],
        out_dir: str | Path,
        metadata: dict | None = None,
        progress: bool = True,
        controls: Tensor | None = None,
    ):
        if len(latents) != len(captions) or len(latents) == 0:
            raise ValueError(
                f"need as many captions as latents (>= 1), got {len(captions)} and {len(latents)}"
            )
        if config.controlnet_blocks and (controls is None or len(controls) != len(latents)):
            got = "none" if controls is None else len(controls)
            raise ValueError(
                f"ControlNet training needs one control latent per latent ({len(latents)}), got {got}"
            )
        if config.paired:
            check_pairs("paired examples need", {"number of latents": len(latents)})
        self.config = c = config
        self.out_dir = Path(out_dir)
        self.metadata = metadata or {}
        self.progress = progress
        self.rank, self.world = (
            (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        )
        if c.batch_size % self.world:
            raise ValueError(
                f"batch_size {c.batch_size} must be divisible by the number of processes {self.world}"
            )
        if c.paired:  # every process's slice of the batch holds whole pairs
            per_process = f"batch per process ({c.batch_size} over {self.world} processes)"
            check_pairs("paired examples need", {per_process: c.batch_size // self.world})
        self.device = next(mmdit.parameters()).device
        if c.bf16 and self.device.type == "cpu" and self.rank == 0:
            warn_if_bf16_is_emulated("bf16 autocast on the CPU")
        self.mmdit, self.text_encoders = mmdit, text_encoders
        self.latents, self.captions, self.controls = latents, captions, controls
        self.sampling = c.sampling()
        self.t5_length = t5_length_for(text_encoders, captions)
        report = truncation_report(text_encoders, captions, self.t5_length)
        if report and self.rank == 0:
            warnings.warn(report, stacklevel=2)

        text_encoders.requires_grad_(c.train_text_encoders)
        for clip in (text_encoders.clip_l, text_encoders.clip_g):
            if hasattr(clip, "text_projection") and not clip.config.project_pooled:
                clip.text_projection.requires_grad_(
                    False
                )  # unused (CLIP-L's pooled is unprojected)
        self.controlnet = None
        if c.lora_rank:
            # seeded: every process (FSDP shards each one's own copy) starts from the same adapters
            generator = torch.Generator().manual_seed(c.seed)
            add_lora(mmdit, c.lora_rank, c.lora_alpha, c.lora_targets, generator)
            mmdit.to(self.device)
        elif c.controlnet_blocks:
            mmdit.requires_grad_(False)
            self.controlnet = controlnet_from_base(mmdit, c.controlnet_blocks)
        else:
            mmdit.requires_grad_(True)
            mmdit.pos_embed.requires_grad_(False)  # SD3's fixed sin-cos table
        if c.grad_checkpointing or c.shard:
            enable_gradient_checkpointing(mmdit)
        # frozen encoders: embed each distinct caption once, unless that would not fit in memory
        positions = text_encoders.clip_length + self.t5_length
        cache_bytes = 4 * len(set(captions)) * positions * text_encoders.context_width
        self.text_cache = None
        if not c.train_text_encoders and cache_bytes <= TEXT_CACHE_BYTES:
            with tqdm(
                total=len(set(captions)), desc="encoding captions", unit="caption",
                disable=self.rank != 0 or not progress,
            ) as bar:  # fmt: skip
                self.text_cache = TextCache(text_encoders, captions, progress=bar.update)
            self.rows = self.text_cache.rows(captions)
        loss = flow_loss
        if c.pair_contrast:  # the mirror-pairs experiment's objective
            from sd3.shapes.objective import pair_contrast_loss

            loss = partial(pair_contrast_loss, weight=c.pair_contrast)
        self.objective = FlowObjective(
            mmdit, text_encoders if self.text_cache is None else None, loss, self.controlnet
        )
        self.objective.train()
        if c.shard:
            sharded.single_process_group()
            self.rank, self.world = dist.get_rank(), dist.get_world_size()
            if self.controlnet is not None:
                sharded.shard_controlnet_training(self.objective, mmdit, self.controlnet, c.bf16)
            else:
                sharded.shard_mmdit(mmdit, c.bf16)
        trained = [(n, p) for n, p in self.objective.named_parameters() if p.requires_grad]
        # text encoders last: with text_encoder_lr they are a second optimizer group, and the
        # optimizer's state is numbered in group order (checkpoints name it by these names)
        trained.sort(key=lambda item: item[0].startswith("text_encoders."))
        self.params = dict(trained)
        groups = [{"params": list(self.params.values()), "lr_scale": 1.0}]
        if c.text_encoder_lr is not None:
            encoder = [p for n, p in trained if n.startswith("text_encoders.")]
            groups = [
                {"params": [p for n, p in trained if not n.startswith("text_encoders.")],
                 "lr_scale": 1.0},
                {"params": encoder, "lr_scale": c.text_encoder_lr / c.lr},
            ]  # fmt: skip
        self.optimizer = torch.optim.AdamW(
            groups, lr=c.lr, betas=c.adam_betas, weight_decay=c.weight_decay
        )
        self.ema = {n: p.detach().clone() for n, p in self.params.items()} if c.ema_decay else {}
        self.model = self.objective
        if self.world > 1 and not c.shard:
            self.model = DistributedDataParallel(self.objective)
        if c.compile:  # fuses the elementwise ops small models are bound by (docs/default-model.md)
            self.model = torch.compile(self.model)
        self.step = 0  # steps completed
        self.saved_step: int | None = None  # the step of the checkpoint on disk, once known
        self.interrupted: int | None = None  # the signal that stopped the last `train`, if one did
        self._orders: dict[int, Tensor] = {}

    # --- data and randomness ------------------------------------------------------------

    def order(self, epoch: int) -> Tensor:
        """The shuffled units (examples, or pairs of them) of an epoch."""
        if epoch not in self._orders:
            g = torch.Generator().manual_seed((self.config.seed * 100_003 + epoch) % SEEDS)
            units = len(self.latents) // self.unit
            self._orders = {epoch: torch.randperm(units, generator=g)}
        return self._orders[epoch]

    @property
    def unit(self) -> int:
        """Examples drawn together: 2 for pairs, else 1."""
        return 2 if self.config.paired else 1

    def batch(self, step: int) -> dict:
        """This process's part of the global batch of `step` (0-based)."""
        c = self.config
        size, n = c.batch_size // self.unit, len(self.latents) // self.unit
        numbers = range(step * size, (step + 1) * size)
        indices = torch.stack([self.order(k // n)[k % n] for k in numbers])
        g = torch.Generator().manual_seed((c.seed * 1_000_003 + step) % SEEDS)
        noise = torch.randn((size, *self.latents.shape[1:]), generator=g)
        sigma = self.sampling(torch.rand(size, generator=g))
        keep = torch.rand(size, 3, generator=g) >= c.text_dropout
        if c.paired:  # each pair's two examples side by side, sharing their draws
            indices = torch.stack([2 * indices, 2 * indices + 1], dim=1).flatten()
            noise, sigma, keep = (t.repeat_interleave(2, dim=0) for t in (noise, sigma, keep))
        local = slice(
            self.rank * c.batch_size // self.world, (self.rank + 1) * c.batch_size // self.world
        )
        indices, noise, sigma, keep = indices[local], noise[local], sigma[local], keep[local]
        batch = {
            "x0": self.latents[indices].to(self.device),
            "noise": noise.to(self.device),
            "sigma": sigma.to(self.device),
        }
        if self.controlnet is not None:
            batch["control"] = self.controls[indices].to(self.device)
        if self.text_cache is not None:
            context, pooled = self.text_cache.get(self.rows[indices], keep)
            batch |= {"context": context.to(self.device), "pooled": pooled.to(self.device)}
        else:
            prompts = [self.captions[i] for i in indices.tolist()]
            ids = tokenize(self.text_encoders, prompts, self.t5_length, keep)
            batch |= {k: v.to(self.device) for k, v in ids.items()} | {"t5_length": self.t5_length}
        return batch

    def lr_at(self, step: int) -> float:
        c = self.config
        if step < c.warmup_steps:
            return c.lr * (step + 1) / (c.warmup_steps + 1)
        if c.lr_schedule == "cosine":
            progress = (step - c.warmup_steps) / max(1, c.steps - c.warmup_steps)
            return c.lr * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        return c.lr

    # --- one step ---------------------------------------------------------------------------

    def train_step(self) -> tuple[Tensor, Tensor]:
        """One optimizer step; returns (loss of this process's samples, gradient norm)."""
        c = self.config
        batch = self.batch(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.step) * group["lr_scale"]
        autocast = (
            torch.autocast(self.device.type, dtype=torch.bfloat16) if c.bf16 else nullcontext()
        )
        with autocast:
            loss = self.model(**batch)
        loss.backward()
        params = list(self.params.values())
        grad_norm = sharded.full(torch.nn.utils.clip_grad_norm_(params, c.grad_clip or math.inf))
        # the gradient norm is the same in every process (DDP averages the gradients first), so
        # all of them stop at the same step; a non-finite loss makes a non-finite gradient
        if not (torch.isfinite(loss) and torch.isfinite(grad_norm)):
            self.optimizer.zero_grad(set_to_none=True)
            raise Diverged(
                f"step {self.step + 1}: the loss is {loss.item():.4g} and the gradient norm "
                f"{grad_norm.item():.4g}; stopped before this step changed the weights "
                f"({self.last_good()}; a lower learning rate often helps)"
            )
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        if self.ema:
            # warm-up of the decay (as in many EMA implementations) so early EMAs are not the init
            decay = min(c.ema_decay, (1 + self.step) / (10 + self.step))
            torch._foreach_lerp_(list(self.ema.values()), [p.detach() for p in params], 1 - decay)
        return loss.detach(), grad_norm.detach()

    # --- the loop ------------------------------------------------------------------------

    def train(self, on_step: Callable[[int, float], None] | None = None) -> int:
        """Train up to `config.steps`; returns the step reached (less on Ctrl-C or SIGTERM, which
        finish the step, save and stop: `interrupted` is then the signal's number). `on_step(step,
        loss)` is called in process 0 after every step (e.g. a caller's own progress display)."""
        c = self.config
        stop = {"requested": False, "signal": None}
        self.interrupted = None
        restore = self._catch_interrupt(stop)
        log = open(self.out_dir / LOG, "a") if self.rank == 0 else None
        bar = tqdm(
            total=c.steps, initial=self.step, disable=self.rank != 0 or not self.progress,
            unit="step", dynamic_ncols=True,
        )  # fmt: skip
        rate, last = None, time.perf_counter()
        try:
            while self.step < c.steps:
                loss, grad_norm = self.train_step()
                summary = torch.stack(
                    [loss.float(), torch.tensor(float(stop["requested"])).to(loss)]
                )
                if self.world > 1:  # the mean loss, and whether any process was interrupted
                    dist.all_reduce(summary)
                    summary[0] /= self.world
                now = time.perf_counter()
                speed = c.batch_size / max(now - last, 1e-9)
                rate = speed if rate is None else 0.9 * rate + 0.1 * speed
                last = now
                if log is not None:
                    stats = {
                        "step": self.step, "loss": summary[0].item(), "lr": self.lr_at(self.step - 1),
                        "grad_norm": grad_norm.item(), "images_per_s": round(speed, 3),
                    }  # fmt: skip
                    log.write(json.dumps(stats, allow_nan=False) + "\n")  # strict JSON
                    bar.set_postfix(loss=f"{stats['loss']:.4f}", img_s=f"{rate:.1f}", refresh=False)
                bar.update()
                if on_step is not None and log is not None:
                    on_step(self.step, stats["loss"])
                if self.step % c.checkpoint_every == 0 or self.step == c.steps or summary[1] > 0:
                    if log is not None:
                        log.flush()
                    self.save()
                if summary[1] > 0:  # the signal of this process, or the one torchrun sends
                    self.interrupted = stop["signal"] or int(signal.SIGINT)
                    break
        finally:
            bar.close()
            if log is not None:
                log.close()
            restore()
        return self.step

    def _catch_interrupt(self, stop: dict):
        """Ctrl-C (or SIGTERM, as torchrun and schedulers send) finishes the current step, saves
        and stops; a second one aborts at once, even mid-save (the checkpoint file is replaced in
        one step, so it holds the previous save or this one, never a torn file). A repeat within
        SAME_SIGNAL_S is the same request: torchrun passes the terminal's Ctrl-C on to workers
        that the terminal told already."""
        signals = (signal.SIGINT, signal.SIGTERM)
        try:
            previous = {s: signal.getsignal(s) for s in signals}
        except ValueError:  # not the main thread: no handler
            return lambda: None

        def restore():
            for s, h in previous.items():
                signal.signal(s, h)

        def handler(signum, frame):
            now = time.monotonic()
            if stop["signal"] is None:
                stop["requested"], stop["signal"], stop["at"] = True, signum, now
            elif now - stop["at"] >= SAME_SIGNAL_S:  # asked again: abort as if never caught
                restore()
                if callable(previous[signum]):
                    previous[signum](signum, frame)
                else:
                    os.kill(os.getpid(), signum)

        try:
            for s in signals:
                signal.signal(s, handler)
        except ValueError:
            return lambda: None
        return restore

    # --- checkpoints -----------------------------------------------------------------------

    @property
    def checkpoint_path(self) -> Path:
        return self.out_dir / (sharded.SHARDED if self.config.shard else CHECKPOINT)

    def trained_weights(self) -> dict[str, Tensor]:
        """The trained network's weights by name, as sharded checkpoints hold them: the MMDiT's
        state dict, a LoRA's adapters alone (the rest is the base model, unchanged) or the
        ControlNet's state dict."""
        if self.controlnet is not None:
            return self.controlnet.state_dict(keep_vars=True)
        if self.config.lora_rank:
            return lora_weights(self.mmdit)
        return self.mmdit.state_dict(keep_vars=True)

    def plain_trained(self) -> nn.Module | None:
        """The trained network (the MMDiT, with its LoRA, or the ControlNet) with whole weights,
        for exports: in process 0, None in the others; sharded, every process calls this and a
        LoRA's copy holds its adapters alone (its base weights stay on the meta device)."""
        module = self.controlnet if self.controlnet is not None else self.mmdit
        if not self.config.shard:
            return module if self.rank == 0 else None
        weights = sharded.gather(self.trained_weights())
        if self.rank != 0:
            return None
        with torch.device("meta"):
            if self.controlnet is not None:
                plain = ControlNet(module.config)
            else:
                plain = MMDiT(module.config)
                if self.config.lora_rank:
                    c = self.config
                    add_lora(plain, c.lora_rank, c.lora_alpha, c.lora_targets)
        plain.load_state_dict(weights, strict=not self.config.lora_rank, assign=True)
        return plain

    def state_tensors(self) -> dict[str, Tensor]:
        tensors = {f"params.{n}": p.detach() for n, p in self.params.items()}
        tensors |= {f"ema.{n}": t for n, t in self.ema.items()}
        names = list(self.params)
        for i, state in self.optimizer.state_dict()["state"].items():
            for key, value in state.items():
                tensors[f"optimizer.{names[i]}.{key}"] = value
        return tensors

    def last_good(self) -> str:
        """Where the last good weights are, in words."""
        if self.saved_step is None:
            return "no checkpoint was written"
        return f"{self.checkpoint_path} still holds step {self.saved_step}"

    def save(self) -> None:
        """Write the checkpoint (process 0; the others wait, so no one runs ahead of a save);
        `Diverged`, with nothing written, if a weight is no longer finite."""
        broken = [n for n, p in self.params.items() if not torch.isfinite(sharded.local(p)).all()]
        if self.config.shard and dist.get_world_size() > 1:  # each rank sees its shards only
            everyone = [None] * dist.get_world_size()
            dist.all_gather_object(everyone, broken)
            broken = sorted({n for names in everyone for n in names})
        if broken:
            raise Diverged(
                f"step {self.step}: {len(broken)} weight tensors are no longer finite (e.g. "
                f"{broken[0]}); not saved ({self.last_good()}; a lower learning rate often helps)"
            )
        state = {
            "step": self.step,
            "config": asdict(self.config),
            "world_size": self.world,
            "metadata": self.metadata,
        }
        if self.config.shard:
            sharded.save(self.out_dir, self.trained_weights(), self.optimizer, self.ema, state)
        elif self.rank == 0:
            save_checkpoint(self.checkpoint_path, self.state_tensors(), state)
        if self.world > 1:
            dist.barrier()
        self.saved_step = self.step

    def resume(self, path: str | Path | None = None) -> int:
        """Load a checkpoint written by `save` (default: this out_dir's); returns its step."""
        path = Path(path) if path is not None else self.checkpoint_path
        if self.config.shard:
            state = sharded.load(path, self.trained_weights(), self.optimizer, self.ema)
            self.step = self.saved_step = int(state["step"])
            if self.rank == 0:
                self._truncate_log()
            return self.step
        tensors, state = load_checkpoint(path)
        names = list(self.params)
        expected = {f"params.{n}" for n in names}
        found = {k for k in tensors if k.startswith("params.")}
        if expected != found:
            raise ValueError(
                f"{path}: its trainable tensors do not match this run (different model or LoRA/text "
                f"encoder settings): missing {sorted(expected - found)[:3]}, "
                f"unexpected {sorted(found - expected)[:3]}"
            )
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(tensors[f"params.{n}"])
                if self.ema:
                    self.ema[n].copy_(tensors.get(f"ema.{n}", tensors[f"params.{n}"]))
        optim_state = {}
        for i, n in enumerate(names):
            entry = {
                key.removeprefix(f"optimizer.{n}."): t
                for key, t in tensors.items()
                if key.startswith(f"optimizer.{n}.")
            }
            if entry:
                optim_state[i] = entry
        groups = self.optimizer.state_dict()["param_groups"]
        self.optimizer.load_state_dict({"state": optim_state, "param_groups": groups})
        self.step = self.saved_step = int(state["step"])
        if self.rank == 0:
            self._truncate_log()
        return self.step

    def _truncate_log(self) -> None:
        """Drop log lines past the checkpoint (steps that will be redone)."""
        path = self.out_dir / LOG
        if path.is_file():
            kept = []
            for line in path.read_text().splitlines():
                try:
                    if json.loads(line)["step"] <= self.step:
                        kept.append(line)
                except (json.JSONDecodeError, KeyError, TypeError):
                    pass  # a line cut short by a kill
            tmp = path.with_name(f".{LOG}.tmp-{os.getpid()}")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, path)  # a kill meanwhile leaves the old log, never half of it

    # --- results ---------------------------------------------------------------------------

    @contextmanager
    def ema_weights(self) -> Iterator[None]:
        """Within this block the trainable parameters hold their EMA (if there is one)."""
        if not self.ema:
            yield
            return
        backup = {n: p.detach().clone() for n, p in self.params.items()}
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(self.ema[n])
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in self.params.items():
                    p.copy_(backup[n])
