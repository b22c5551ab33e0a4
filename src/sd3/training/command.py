"""`sd3 train`: fine-tune or train from scratch an SD3 / SD3.5 model with rectified flow.

    sd3 train --model sd3.5_medium.safetensors --data pictures/ --out run1 --lora-rank 16
    sd3 train --init-config small --shapes 20000 --resolution 64 --out shapes --bf16
    sd3 train --out shapes --resume                      # continue where it stopped
    sd3 train --model sd3_shapes.safetensors --shapes 4000 --resolution 128 --controlnet --out cn
    torchrun --nproc_per_node 4 -m sd3.training.command ...   # data-parallel (DDP)
    torchrun --nproc_per_node 4 -m sd3 train --shard ...      # sharded (FSDP2)
    sd3 train export RUN OUT.safetensors                 # a run's checkpoint as one model file

Writes into --out: checkpoint.safetensors (every --checkpoint-every steps), log.jsonl, and at the
end model.safetensors (Stability's single-file layout, EMA weights), lora.safetensors
(diffusers' SD3 LoRA format) or controlnet.safetensors (Stability's SD3.5 ControlNet layout, canny).
A fresh --init-config model is first saved as base.safetensors.

Everything that can be checked is checked before the models load, and before anything is
written: the settings (finite and in range; on --resume, that only the resumable ones change),
--device, every model file's keys and shapes, the image size and the LoRA targets against the
model, every image of --data (decoded once, unless the latent cache in --out was made from these
very files), and that --out can take files. Ctrl-C (or SIGTERM) finishes the step, saves, prints
the command that resumes and exits with 130 (143), exporting only with --export-on-interrupt; a
loss that stops being finite stops the run (exit 1), the last good checkpoint kept. A fresh run
that fails before its first checkpoint removes the files and folders it made, except a finished
latent cache (which a second try reuses). Exports never replace a file: a taken name moves on to
the next free one (model_1.safetensors).
"""

import argparse
import json
import math
import os
import re
import shlex
import sys
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.distributed as dist

from sd3 import distributed
from sd3.checkpoints import (
    DTYPE_NAMES,
    CheckpointError,
    Component,
    SafetensorsFile,
    check_component,
    find_components,
    load_component,
)
from sd3.cli import guarded, parse_device
from sd3.models.mmdit import MMDiT
from sd3.models.vae import AutoEncoder
from sd3.outputs import OutputError, check_folder, check_new_file
from sd3.pipeline import MAX_SEED
from sd3.presets import PRESET_METADATA, Preset, preset_for
from sd3.text import TextEncoders

from . import sharded
from .checkpoint import load_checkpoint, read_state, remove_stale_temporaries
from .controlnet import (
    check_blocks,
    control_encoder,
    controlnet_from_base,
    save_controlnet,
    shapes_edges,
)
from .data import ImageCaptionFolder, cached_latents, check_pairs, load_latents
from .export import export_single_file, save_lora
from .flow import SAMPLINGS
from .fresh import INIT_CONFIGS, fresh_models
from .lora import DEFAULT_TARGETS, add_lora, lora_targets, lora_weights
from .trainer import CHECKPOINT, LOG, Diverged, TrainConfig, Trainer

# options that may differ on --resume (everything else comes from the checkpoint)
RESUMABLE = {
    "out", "resume", "steps", "checkpoint_every", "device", "export_dtype", "quiet", "threads",
    "export_on_interrupt",
}  # fmt: skip
LATENTS, BASE = "latents.safetensors", "base.safetensors"
CONTROLS = "controls.safetensors"  # --controlnet: the control latents' cache
RUN_FILES = (CHECKPOINT, LOG, LATENTS, BASE, CONTROLS)  # what a run writes in --out itself
EXPORTS = "model|lora|controlnet"  # names of its exports (model.safetensors, lora-step40...)
BASE_KEY = "sd3_base"  # base.safetensors' metadata: which --init-config and --seed made it
RESOLUTION = 256  # --resolution's default; the others are TrainConfig's
DEFAULTS = {f.name: f.default for f in fields(TrainConfig)}


def mix_argument(text: str) -> dict[str, float]:
    """argparse type of a shapes caption mix ("kind=weight,..."), its error naming the option."""
    from sd3.shapes.scenes import parse_mix

    try:
        return parse_mix(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _whole(low: int, high: int | None = None, high_text: str | None = None):
    """argparse type: a whole number in [low, high]."""

    def whole_number(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
        if high is not None and not low <= value <= high:
            raise argparse.ArgumentTypeError(
                f"must be in [{low}, {high_text or high}], got {value}"
            )
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    return whole_number


def _number(low: float = -math.inf, high: float = math.inf, low_open: bool = False):
    """argparse type: a finite number in [low, high] (or (low, high] with `low_open`)."""

    def number(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if not (low < value if low_open else low <= value) or value > high:
            bracket = "(" if low_open else "["
            end = f"{high}]" if math.isfinite(high) else "inf)"
            raise argparse.ArgumentTypeError(f"must be in {bracket}{low}, {end}, got {value}")
        return value

    return number


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options; those not given stay None (so --resume can tell what was given) and take
    their defaults in `_apply_defaults`: RESOLUTION, and TrainConfig's for the rest."""
    d = DEFAULTS
    src = parser.add_argument_group("model (one of --model, --init-config; neither with --resume)")
    src.add_argument("--model", type=Path, help="single file or diffusers folder to start from")
    src.add_argument("--init-config", choices=list(INIT_CONFIGS), help="a fresh model of this size")
    src.add_argument("--vae", type=Path, help="VAE file replacing the model's")
    src.add_argument("--clip-l", type=Path, help="CLIP-L file (if the model file has none)")
    src.add_argument("--clip-g", type=Path, help="CLIP-G file (if the model file has none)")
    src.add_argument("--t5xxl", type=Path, help="T5-XXL file (optional)")

    data = parser.add_argument_group("data (one of --data, --shapes)")
    data.add_argument("--data", type=Path, help="folder of images with same-name .txt captions")
    data.add_argument(
        "--skip-bad-images", action="store_true",
        help="leave out images that cannot be read (a warning gives their count and names) "
        "instead of stopping at the first",
    )  # fmt: skip
    data.add_argument("--shapes", type=_whole(1), metavar="N", help="N procedural shape scenes")
    data.add_argument(
        "--shapes-mix", type=mix_argument, metavar="KIND=W,...",
        help="shares of the shape captions' kinds (single, counting, pair, position, group; "
        "default 20/20/20/25/15 percent), e.g. counting=3,position=4,pair=2,group=1",
    )  # fmt: skip
    data.add_argument(
        "--shapes-mirror-pairs", action="store_true",
        help="each shape scene next to its mirror image, whose caption names the relation's "
        "objects the other way round, the two in one batch with the same noise and timestep",
    )  # fmt: skip
    data.add_argument(
        "--resolution", type=_whole(16), help=f"square size (multiple of 16; default {RESOLUTION})"
    )

    run = parser.add_argument_group("run")
    run.add_argument("--out", type=Path, required=True, help="output folder")
    run.add_argument(
        "--resume", action="store_true",
        help="continue from --out's checkpoint, with its settings: only --steps (raised), "
        "--checkpoint-every, --device, --export-dtype, --export-on-interrupt, --threads and "
        "--quiet may change",
    )  # fmt: skip
    run.add_argument(
        "--steps", type=_whole(1), help=f"total optimizer steps (default {d['steps']})"
    )
    run.add_argument(
        "--batch-size", type=_whole(1), help=f"global batch size (default {d['batch_size']})"
    )
    run.add_argument(
        "--checkpoint-every", type=_whole(1), help=f"steps (default {d['checkpoint_every']})"
    )
    run.add_argument("--seed", type=_whole(0, MAX_SEED, "2**63 - 1"), help="default 0")
    run.add_argument(
        "--device", help="default: cuda (cuda:LOCAL_RANK under torchrun) if available, else cpu"
    )
    run.add_argument(
        "--export-dtype", choices=list(DTYPE_NAMES), help="of model.safetensors (fp32)"
    )
    run.add_argument(
        "--export-on-interrupt", action="store_true",
        help="on Ctrl-C also export the model reached, as model-stepN.safetensors (or "
        "lora-stepN.safetensors); without it Ctrl-C only saves the checkpoint",
    )  # fmt: skip
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    run.add_argument(
        "--threads", type=_whole(1),
        help="CPU threads per process (default: PyTorch's); 1 is often fastest on a busy machine",
    )  # fmt: skip

    opt = parser.add_argument_group("optimization")
    opt.add_argument("--lr", type=_number(0, low_open=True), help=f"default {d['lr']}")
    opt.add_argument("--lr-schedule", choices=["constant", "cosine"], help="default constant")
    opt.add_argument("--warmup-steps", type=_whole(0), help="default 0")
    opt.add_argument("--weight-decay", type=_number(0), help="default 0")
    opt.add_argument(
        "--ema-decay", type=_number(0, 0.999999), help=f"0: no EMA (default {d['ema_decay']})"
    )
    opt.add_argument(
        "--grad-clip", type=_number(0), help=f"0: no clipping (default {d['grad_clip']})"
    )
    opt.add_argument("--bf16", action="store_true", help="bf16 autocast (fp32 weights)")
    opt.add_argument(
        "--grad-checkpointing", action="store_true", help="recompute joint blocks in backward"
    )
    opt.add_argument(
        "--shard", action="store_true",
        help="FSDP2 under torchrun: each of N processes holds 1/N of the MMDiT's weights (and of "
        "a trained ControlNet's), the trained ones' gradients and AdamW state, with activation "
        "checkpointing; checkpoints are sharded "
        "(checkpoint.sharded, resumable on any number of processes; `sd3 train export`)",
    )  # fmt: skip
    opt.add_argument(
        "--compile", action="store_true",
        help="torch.compile the training step (a minute or two to compile; pays on long runs)",
    )  # fmt: skip

    flow = parser.add_argument_group("rectified flow")
    flow.add_argument(
        "--timestep-sampling", choices=SAMPLINGS, help=f"default {d['timestep_sampling']}"
    )
    flow.add_argument("--logit-mean", type=_number(), help="default 0")
    flow.add_argument("--logit-std", type=_number(0, low_open=True), help="default 1")
    flow.add_argument("--mode-scale", type=_number(-1, 1.75), help=f"default {d['mode_scale']}")
    flow.add_argument("--shift", type=_number(0, low_open=True), help="default 1")
    flow.add_argument(
        "--pair-contrast", type=_number(0), metavar="W",
        help="with --shapes-mirror-pairs: extra weight on the difference of a pair's errors",
    )  # fmt: skip

    text = parser.add_argument_group("text encoders and LoRA")
    text.add_argument(
        "--text-dropout", type=_number(0, 1),
        help=f"per encoder and sample (default {d['text_dropout']})",
    )  # fmt: skip
    text.add_argument("--train-text-encoders", action="store_true", help="train them jointly")
    text.add_argument(
        "--text-encoder-lr", type=_number(0, low_open=True),
        help="their peak learning rate, on the same schedule (default: --lr)",
    )  # fmt: skip
    text.add_argument(
        "--t5-length", type=_whole(1),
        help="fixed T5 token count (default: as sampling, >= 77); a short one shortens the context "
        "and speeds training up; sample with the same t5_length",
    )  # fmt: skip
    text.add_argument("--lora-rank", type=_whole(0), help="> 0: train LoRA only (default 0)")
    text.add_argument("--lora-alpha", type=_number(0, low_open=True), help="default: rank")
    text.add_argument(
        "--lora-targets",
        help="comma-separated MMDiT layer-name suffixes, e.g. attn.qkv,attn.proj,mlp.fc1,mlp.fc2 "
        f"(default {','.join(DEFAULT_TARGETS)})",
    )

    control = parser.add_argument_group("ControlNet")
    control.add_argument(
        "--controlnet", action="store_true",
        help="train a ControlNet (SD3.5 Large kind) for --model, which stays frozen, on the "
        "--shapes scenes with their edges as canny control images; exports controlnet.safetensors "
        "in Stability's layout",
    )  # fmt: skip
    control.add_argument(
        "--controlnet-blocks", type=_whole(1), metavar="N",
        help="its blocks, initialised from the MMDiT's first N (default: half the MMDiT's, as "
        "SD3.5 Large's 19 of 38)",
    )  # fmt: skip


def _dash(name: str) -> str:
    return "--" + name.replace("_", "-")


def _apply_defaults(args: argparse.Namespace) -> None:
    for name, value in DEFAULTS.items():
        if name in vars(args) and getattr(args, name) is None:
            setattr(args, name, value)
    if args.resolution is None:
        args.resolution = RESOLUTION
    if not isinstance(args.lora_targets, str):
        args.lora_targets = ",".join(args.lora_targets)
    args.export_dtype = args.export_dtype or "fp32"


def train_config(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig of the options; its errors name the options (--lr, not lr)."""
    names = {f.name for f in fields(TrainConfig)}
    values = {k: v for k, v in vars(args).items() if k in names and v is not None}
    values["lora_targets"] = tuple(t.strip() for t in args.lora_targets.split(",") if t.strip())
    values["paired"] = args.shapes_mirror_pairs
    values["controlnet_blocks"] = (args.controlnet_blocks or 0) if args.controlnet else 0
    try:
        return TrainConfig(**values)
    except (ValueError, TypeError) as e:
        options = sorted((n for n in names if n in vars(args)), key=len, reverse=True)
        text = re.sub(rf"\b({'|'.join(options)})\b", lambda m: _dash(m[1]), str(e))
        raise ValueError(text) from None


def _base_identity(args: argparse.Namespace) -> str:
    return json.dumps({"init_config": args.init_config, "seed": args.seed})


def _metadata(path: Path) -> dict | None:
    """The safetensors metadata of `path`; None if there is no such file, {} if it is no
    safetensors file."""
    if not (path.exists() or path.is_symlink()):
        return None
    try:
        return SafetensorsFile(path).metadata
    except CheckpointError:
        return {}


def _base_is_current(args: argparse.Namespace) -> bool:
    """Whether --out's base.safetensors is the fresh model this run starts from: on --resume the
    run's own (whichever sd3 wrote it), else one made for this --init-config and --seed."""
    base = args.out / BASE
    if args.resume:
        return base.is_file()
    return (_metadata(base) or {}).get(BASE_KEY) == _base_identity(args)


def _load_models(args: argparse.Namespace, rank: int, found: dict[str, Component]) -> dict:
    """The model family: from --model (+ separate files), or fresh (saved once as base.safetensors)."""
    if args.init_config:
        base = args.out / BASE
        if rank == 0 and not _base_is_current(args):
            meta = {BASE_KEY: _base_identity(args)}
            export_single_file(base, fresh_models(args.init_config, args.seed), metadata=meta)
        if dist.is_initialized():
            dist.barrier()
        found = find_components(base, vae=args.vae)
    return {name: load_component(comp) for name, comp in found.items()}


def _check_models(args: argparse.Namespace) -> dict[str, Component]:
    """Every model file's keys and shapes, the image size and the LoRA targets, on models on the
    meta device (no weight read). Returns the components of --model and the separate files."""
    if args.init_config:
        family = INIT_CONFIGS[args.init_config]
        with torch.device("meta"):
            modules = {"mmdit": MMDiT(family.mmdit), "vae": AutoEncoder(family.vae)}
        found = find_components(vae=args.vae) if args.vae else {}
    else:
        modules = {}
        try:
            found = find_components(args.model)
        except CheckpointError as e:
            raise CheckpointError(f"--model {e}") from None
        found.update(find_components(None, args.clip_l, args.clip_g, args.t5xxl, args.vae))
        missing = [name for name in ("mmdit", "vae", "clip_l", "clip_g") if name not in found]
        if missing:
            raise ValueError(
                f"--model {args.model}: no {', '.join(missing)} found; pass a file that bundles "
                "them or the separate --vae / --clip-l / --clip-g files"
            )
    modules |= {name: check_component(comp) for name, comp in found.items()}
    if not args.init_config:
        _check_text_widths(modules)
    latent = args.resolution // modules["vae"].downscale
    try:
        modules["mmdit"].check_size(latent, latent)
    except ValueError as e:
        raise ValueError(f"--resolution {args.resolution}: {e}") from None
    if args.controlnet:
        depth = modules["mmdit"].config.depth
        args.controlnet_blocks = args.controlnet_blocks or max(1, depth // 2)
        try:
            check_blocks(args.controlnet_blocks, depth)
        except ValueError as e:
            raise ValueError(f"--controlnet-blocks {args.controlnet_blocks}: {e}") from None
    if args.lora_rank:
        targets = [t.strip() for t in args.lora_targets.split(",") if t.strip()]
        try:
            lora_targets(modules["mmdit"], targets)
        except ValueError as e:
            raise ValueError(f"--lora-targets {args.lora_targets}: {e}") from None
    return found


def _check_text_widths(modules: dict) -> None:
    """The text encoders' widths fit the MMDiT's (else the first step fails on a shape): pooled =
    CLIP-L | CLIP-G pooled, the context holds CLIP-L | CLIP-G and T5 side by side."""
    c = modules["mmdit"].config
    l_width, g_width = modules["clip_l"].config.width, modules["clip_g"].config.width
    t5 = modules.get("t5xxl")
    t5_width = t5.config.d_model if t5 is not None else 0
    if l_width + g_width != c.pooled_dim or max(l_width + g_width, t5_width) > c.context_dim:
        raise ValueError(
            f"the text encoders do not fit the MMDiT of --model: CLIP-L {l_width} + CLIP-G "
            f"{g_width} wide (its pooled input is {c.pooled_dim}), T5 {t5_width} wide (its context "
            f"is {c.context_dim}); check --clip-l, --clip-g and --t5xxl"
        )


def _cache_names(text: object) -> list[str] | None:
    """The list of names a latent cache records, or None if it records none readable."""
    try:
        names = json.loads(text) if isinstance(text, str) else None
    except json.JSONDecodeError:
        return None
    ok = isinstance(names, list) and all(isinstance(n, str) for n in names)
    return names if ok else None


def _dataset(args: argparse.Namespace, rank: int, quiet: bool):
    """The dataset, every image checked, and its key in the latent cache."""
    if args.data is not None:
        dataset = ImageCaptionFolder(args.data, args.resolution, "--data")
        fingerprint = dataset.fingerprint()
        cached = _metadata(args.out / LATENTS) or {}
        known_bad = (
            _cache_names(cached.get("skipped")) if cached.get("data") == fingerprint else None
        )
        if known_bad is not None and (args.skip_bad_images or not known_bad):
            dataset.leave_out(known_bad)  # decoded when the cache was made: unchanged since
        else:
            progress = {"desc": "checking images", "unit": "img", "disable": quiet or rank != 0}
            try:
                dataset.check_images(args.skip_bad_images, progress)
            except ValueError as e:
                if args.skip_bad_images:  # none readable
                    raise
                raise ValueError(
                    f"{e}; or pass --skip-bad-images to leave such files out"
                ) from None
        if rank == 0:
            _report(dataset)
        skipped = json.dumps([dataset.name(p) for p, _ in dataset.skipped])
        return dataset, {"data": fingerprint, "skipped": skipped}
    try:
        from sd3.shapes.scenes import ShapesDataset
    except ImportError as e:
        raise ValueError(f"--shapes: the shapes dataset is not available ({e})") from None
    mirror = args.shapes_mirror_pairs
    try:
        dataset = ShapesDataset(args.resolution, args.shapes, args.seed, args.shapes_mix, mirror)
    except ValueError as e:
        raise ValueError(f"--shapes {args.shapes} at --resolution {args.resolution}: {e}") from None
    key = f"shapes:{args.shapes}:{args.resolution}:{args.seed}" + (
        ":mirror-pairs" if mirror else ""
    )
    if args.shapes_mix is not None:
        key += ":" + ",".join(f"{k}={w:.6g}" for k, w in dataset.mix.items())
    return dataset, {"data": key}


def _some(names: list[str]) -> str:
    return ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")


def _report(dataset: ImageCaptionFolder) -> None:
    """Warnings about what the folder's data will not do as the user may think."""
    if dataset.skipped:
        names = [dataset.name(p) for p, _ in dataset.skipped]
        warnings.warn(
            f"--skip-bad-images: left out {len(names)} of {len(dataset.found)} images that "
            f"cannot be read: {_some(names)}",
            stacklevel=2,
        )
    if dataset.uncaptioned:
        names = [dataset.name(p.with_suffix(".txt")) for p in dataset.uncaptioned]
        warnings.warn(
            f"{len(names)} of {len(dataset)} caption files are empty ({_some(names)}): those "
            "images train unconditionally, as --text-dropout's share of every caption does",
            stacklevel=2,
        )


def _latents(args, dataset, key: dict, vae, rank: int, quiet: bool):
    """VAE latents of the dataset, cached in --out/latents.safetensors (computed by process 0)."""
    with torch.no_grad():
        vae_key = f"{sum(p.double().sum().item() for p in vae.encoder.parameters()):.10e}"
    cache, key = args.out / LATENTS, {**key, "vae": vae_key}
    if rank == 0:
        progress = {"desc": "encoding images", "unit": "img", "disable": quiet}
        latents, captions = cached_latents(cache, dataset, vae, key, progress=progress)
    if dist.is_initialized():
        dist.barrier()
    return (latents, captions) if rank == 0 else load_latents(cache)


def _controls(args, dataset, key: dict, vae, rank: int, quiet: bool):
    """The control latents of the scenes' edges, as sampling encodes a canny control image,
    cached in --out/controls.safetensors (computed by process 0)."""
    with torch.no_grad():
        vae_key = f"{sum(p.double().sum().item() for p in vae.encoder.parameters()):.10e}"
    cache, key = args.out / CONTROLS, {**key, "vae": vae_key, "control": "canny edges"}
    if rank == 0:
        progress = {"desc": "encoding edges", "unit": "img", "disable": quiet}
        controls, _ = cached_latents(
            cache, shapes_edges(dataset), vae, key, progress=progress, encode=control_encoder(vae)
        )
    if dist.is_initialized():
        dist.barrier()
    return controls if rank == 0 else load_latents(cache)[0]


def _same(name: str, given: object, saved: object) -> bool:
    if name == "lora_targets" and isinstance(saved, str):
        return [t.strip() for t in str(given).split(",")] == [t.strip() for t in saved.split(",")]
    if isinstance(given, Path):
        return isinstance(saved, str) and Path(saved) == given
    return given == saved


def _resume_args(args: argparse.Namespace, given: set[str]) -> tuple[argparse.Namespace, int]:
    """The checkpoint's options, with those given that may change; and the checkpoint's step."""
    path, state = run_state(args.out)
    if path is None:
        raise ValueError(f"--resume: no {CHECKPOINT} or {sharded.SHARDED} in {args.out}")
    meta = state.get("metadata")
    saved = meta.get("args") if isinstance(meta, dict) else None
    if not isinstance(saved, dict):
        raise ValueError(f"--resume: {path} was not written by `sd3 train`")
    for name in sorted(given - RESUMABLE):
        if name in saved and not _same(name, getattr(args, name), saved[name]):
            raise ValueError(
                f"{_dash(name)} {getattr(args, name)}: a resumed run keeps its settings "
                f"({_dash(name)} {saved[name]} in {path}); only --steps, --checkpoint-every, "
                "--device, --export-dtype, --export-on-interrupt, --threads and --quiet may change"
            )
    merged = vars(args) | saved  # options added since the checkpoint keep their defaults
    for name in RESUMABLE & given:
        merged[name] = getattr(args, name)
    merged["steps"] = args.steps if args.steps is not None else saved.get("steps")
    for k in ("model", "vae", "clip_l", "clip_g", "t5xxl", "data", "out"):
        merged[k] = Path(merged[k]) if merged.get(k) is not None else None
    step = state["step"]
    steps = merged["steps"]
    if isinstance(steps, int) and steps < step:
        raise ValueError(f"--steps {steps} is below step {step}, which {path} holds")
    if steps == step and args.steps is None:
        raise ValueError(
            f"--resume: the run in {args.out} is finished (step {step} of {steps}); pass a higher "
            "--steps to train on"
        )
    return argparse.Namespace(**merged), step


def run_state(out: Path) -> tuple[Path | None, dict]:
    """The run's checkpoint (single file or sharded folder) and its state; (None, {}) if none."""
    if (out / CHECKPOINT).is_file():
        return out / CHECKPOINT, read_state(out / CHECKPOINT)
    path = sharded.find_checkpoint(out)
    return (path, sharded.read_state(path)) if path is not None else (None, {})


def _check_sources(args: argparse.Namespace, given: set[str]) -> None:
    if (args.model is None) == (args.init_config is None):
        raise ValueError("give exactly one of --model FILE and --init-config NAME")
    if (args.data is None) == (args.shapes is None):
        raise ValueError("give exactly one of --data FOLDER and --shapes N")
    for name in ("clip_l", "clip_g", "t5xxl"):
        if args.init_config and getattr(args, name) is not None:
            raise ValueError(
                f"{_dash(name)} applies to --model only (--init-config makes fresh text encoders)"
            )
    if args.shapes_mix is not None and args.shapes is None:
        raise ValueError("--shapes-mix applies to --shapes N only")
    if args.skip_bad_images and args.data is None:
        raise ValueError("--skip-bad-images applies to --data FOLDER only")
    if args.shapes_mirror_pairs:
        if args.shapes is None:
            raise ValueError("--shapes-mirror-pairs applies to --shapes N only")
        check_pairs(
            "--shapes-mirror-pairs needs",
            {"--shapes": args.shapes, "--batch-size": args.batch_size},
        )
    if args.pair_contrast and not args.shapes_mirror_pairs:
        raise ValueError("--pair-contrast needs --shapes-mirror-pairs (the pairs it contrasts)")
    for name in ("lora_alpha", "lora_targets"):
        if name in given and not args.lora_rank:
            raise ValueError(f"{_dash(name)} applies to LoRA training (--lora-rank R) only")
    if args.resolution % 16:
        raise ValueError(f"--resolution must be a multiple of 16, got {args.resolution}")
    if args.controlnet_blocks and not args.controlnet:  # 0: not given (TrainConfig's default)
        raise ValueError("--controlnet-blocks applies to ControlNet training (--controlnet) only")
    if args.controlnet:
        if args.model is None:
            raise ValueError("--controlnet trains a ControlNet for a trained model: give --model")
        if args.shapes is None:
            raise ValueError(
                "--controlnet trains on --shapes N (the scenes' edges are its control images); "
                "a --data folder has no control images"
            )
        for name in ("lora_rank", "train_text_encoders"):
            if getattr(args, name):
                raise ValueError(
                    f"--controlnet keeps the MMDiT and the text encoders frozen: no {_dash(name)}"
                )


def _check_out(out: Path) -> None:
    """--out is a folder that takes new files, or can be made as one."""
    if out.is_dir():
        check_folder(out, "--out")
        return
    if out.exists() or out.is_symlink():
        raise OutputError(f"--out {out} is a file, not a folder")
    parent = out.parent
    while not parent.is_dir():
        if parent.exists() or parent.is_symlink():
            raise OutputError(f"--out {out}: {parent} is a file, not a folder")
        parent = parent.parent
    check_folder(parent, "--out", out)


def _is_training_log(path: Path) -> bool:
    """Whether `path` reads as sd3's log.jsonl (its last line may be cut short by a kill)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (UnicodeDecodeError, OSError):
        return False
    for i, line in enumerate(lines):
        try:
            entry = json.loads(line)
            ok = isinstance(entry, dict) and "step" in entry
        except json.JSONDecodeError:
            ok = i == len(lines) - 1 and line.startswith('{"step": ')
        if not ok:
            return False
    return True


def _check_own_files(args: argparse.Namespace) -> None:
    """A fresh run into a folder that exists: the files it writes by name are absent, or are the
    leftovers of an earlier sd3 run (then reused or replaced), never someone else's."""
    out = args.out
    if (out / CHECKPOINT).is_file() or sharded.find_checkpoint(out) is not None:
        raise ValueError(
            f"--out {out} already holds a checkpoint: pass --resume to continue it, or "
            "choose another folder"
        )
    log, latents, base = out / LOG, _metadata(out / LATENTS), _metadata(out / BASE)
    foreign = []
    if log.exists() and not _is_training_log(log):
        foreign.append(LOG)
    if latents is not None and "captions" not in latents:
        foreign.append(LATENTS)
    controls = _metadata(out / CONTROLS)
    if controls is not None and "captions" not in controls:
        foreign.append(CONTROLS)
    if args.init_config and base is not None and BASE_KEY not in base:
        foreign.append(BASE)
    if foreign:
        raise OutputError(
            f"--out {out} holds {', '.join(foreign)} that sd3 train did not write; sd3 never "
            "overwrites a file: choose another folder"
        )


@dataclass
class Plan:
    """A checked run: nothing is loaded or written yet."""

    args: argparse.Namespace
    config: TrainConfig
    device: torch.device | None
    found: dict[str, Component]
    dataset: object
    key: dict[str, str]


def _prepare(args: argparse.Namespace) -> Plan:
    """Every check that needs no model weights, in the order of their cost; nothing written."""
    given = {k for k, v in vars(args).items() if v not in (None, False)}
    rank = int(os.environ.get("RANK", "0"))
    _check_out(args.out)
    if args.resume:
        args, _ = _resume_args(args, given)
        try:
            _apply_defaults(args)
            _check_sources(args, given)
            config = train_config(args)
        except (ValueError, TypeError, AttributeError) as e:
            path = run_state(args.out)[0]
            raise ValueError(f"--resume: {path} holds settings sd3 cannot use: {e}") from None
    else:
        _apply_defaults(args)
        _check_sources(args, given)
        config = train_config(args)
        if args.out.is_dir():
            _check_own_files(args)
    device = parse_device(args.device) if args.device else None
    if rank == 0 and config.warmup_steps >= config.steps:
        warnings.warn(
            f"--warmup-steps {config.warmup_steps} >= --steps {config.steps}: the learning rate "
            f"never reaches --lr {config.lr}",
            stacklevel=2,
        )
    found = _check_models(args)
    if args.controlnet:  # its block count is known now that the MMDiT's depth is
        config = train_config(args)
    dataset, key = _dataset(args, rank, args.quiet)
    return Plan(args, config, device, found, dataset, key)


def _make_folders(out: Path) -> list[Path]:
    """Make --out and any missing folder above it; returns those made, outermost first."""
    missing = []
    while not out.is_dir():
        missing.append(out)
        out = out.parent
    for folder in reversed(missing):
        folder.mkdir()
    return missing[::-1]


def _remove_failed_run(out: Path, made: list[Path], before: set[str]) -> None:
    """After a fresh run that saved no checkpoint: remove the files it wrote (a finished latent
    cache stays, for the next try) and the folders it made, where they are then empty."""
    for name in (LOG, BASE, CHECKPOINT):
        if name not in before:
            (out / name).unlink(missing_ok=True)
    remove_stale_temporaries(out, RUN_FILES, EXPORTS)
    sharded.remove_temporaries(out)
    for folder in reversed(made):
        try:
            folder.rmdir()
        except OSError:  # not empty: the latent cache, or someone's file
            break


def _resume_command(out: Path) -> str:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    tail = f"--out {shlex.quote(str(out))} --resume"
    if world == 1:
        return f"sd3 train {tail}"
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if local == world:
        return f"torchrun --standalone --nproc_per_node {world} -m sd3.training.command {tail}"
    return f"torchrun (this job's options) -m sd3.training.command {tail}"


def _kept(out: Path) -> str:
    """What there is to resume in `out`, in words."""
    try:
        path, state = run_state(out)
    except (CheckpointError, OSError):
        path = None
    if path is None:
        return "no checkpoint was saved"
    return f"{path} holds step {state['step']}; resume with: {_resume_command(out)}"


def run(args: argparse.Namespace) -> int:
    """`sd3 train`: the exit status; errors are one line each (`sd3.cli.guarded`)."""
    return guarded("train", lambda: _train(args))


def _train(args: argparse.Namespace) -> int:
    out = args.out
    try:
        return _execute(_prepare(args))
    except Diverged as e:
        print(f"sd3 train: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # outside the loop, or a second Ctrl-C within it
        print(f"sd3 train: interrupted; {_kept(out)}", file=sys.stderr)
        return 130


def _execute(plan: Plan) -> int:
    args, config = plan.args, plan.config
    first = int(os.environ.get("RANK", "0")) == 0
    made, before = [], set()
    if first:
        made = _make_folders(args.out)
        for path in remove_stale_temporaries(args.out, RUN_FILES, EXPORTS):
            print(f"removed {path}, left by a run that was killed", file=sys.stderr)
        if not args.resume:
            (args.out / LOG).unlink(missing_ok=True)  # a dead run's: checked in _check_own_files
        before = {p.name for p in args.out.iterdir()}
    try:
        if args.threads:
            torch.set_num_threads(args.threads)
        rank, world, device = distributed.join(plan.device)
        quiet = args.quiet or rank != 0
        models = _load_models(args, rank, plan.found)
        models["vae"].to(device)
        latents, captions = _latents(args, plan.dataset, plan.key, models["vae"], rank, quiet)
        controls = None
        if config.controlnet_blocks:
            controls = _controls(args, plan.dataset, plan.key, models["vae"], rank, quiet)
        models["vae"].cpu()
        mmdit = models["mmdit"].to(device)
        # a model that stores its preset may read fewer CLIP positions than 77: train it so
        found = plan.found.get("mmdit")
        preset = preset_for(mmdit.config, str(args.model or ""), found and found.metadata)
        text_encoders = TextEncoders(
            models["clip_l"], models["clip_g"], models.get("t5xxl"),
            context_width=mmdit.config.context_dim, t5_length=args.t5_length,
            clip_length=preset.clip_length,
        ).to(device)  # fmt: skip
        saved_args = {  # for --resume; leaves out what a surrounding CLI adds (e.g. its handler)
            k: str(v) if isinstance(v, Path) else v
            for k, v in vars(args).items()
            if v is None or isinstance(v, str | int | float | bool | Path | dict)
        }
        trainer = Trainer(
            config, mmdit, text_encoders, latents, captions, args.out,
            metadata={"args": saved_args}, progress=not quiet, controls=controls,
        )  # fmt: skip
        if args.resume:
            trainer.resume()
            if rank == 0:
                print(f"resumed {trainer.checkpoint_path} at step {trainer.step}", file=sys.stderr)
        step = trainer.train()
    except BaseException:
        if first and not args.resume and run_state(args.out)[0] is None:
            _remove_failed_run(args.out, made, before)
        raise
    status = 0
    exporter = rank == 0 or config.shard  # every rank gathers the sharded weights
    if trainer.interrupted is not None:
        if rank == 0:
            print(
                f"sd3 train: interrupted at step {step} of {config.steps}, saved in "
                f"{trainer.checkpoint_path}; resume with: {_resume_command(args.out)}",
                file=sys.stderr,
            )
        if args.export_on_interrupt and exporter:
            _export(args, trainer, models, preset, f"-step{step}")
    elif exporter:
        _export(args, trainer, models, preset)
    if rank == 0 and trainer.interrupted is None:
        print(
            f"step {step}: checkpoint {trainer.checkpoint_path}, log {args.out / LOG}",
            file=sys.stderr,
        )
    if trainer.interrupted is not None:
        status = 128 + trainer.interrupted
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return status


PATH_ARGS = ("model", "vae", "clip_l", "clip_g", "t5xxl", "data", "out")


def shared_record(step: int, args: dict) -> str:
    """The training record an exported file carries: the step and the settings, with files and
    folders by name only (an exported model travels; the paths of the machine it came from stay)."""
    args = {
        k: Path(v).name if k in PATH_ARGS and isinstance(v, str) else v for k, v in args.items()
    }
    return json.dumps({"step": step, "args": args})


def _export(
    args: argparse.Namespace, trainer: Trainer, models: dict, preset: Preset, suffix: str = ""
) -> None:
    """model.safetensors, lora.safetensors or controlnet.safetensors (with `suffix` before
    .safetensors), never over an existing file: a taken name moves on to the next free one.
    Sharded: every rank calls this."""
    with trainer.ema_weights():
        trained = trainer.plain_trained()  # sharded: gathered into rank 0
        if trained is None:
            return
        path = _write_export(
            args.out / f"{export_name(trainer.config)}{suffix}.safetensors", "--out",
            trainer.config, trained, models, preset, args.export_dtype,
            shared_record(trainer.step, trainer.metadata["args"]),
        )  # fmt: skip
    print(f"saved {path}{' (EMA weights)' if trainer.ema else ''}", file=sys.stderr)


def export_name(config: TrainConfig) -> str:
    """What a run exports: "model", "lora" or "controlnet" (.safetensors)."""
    return "controlnet" if config.controlnet_blocks else "lora" if config.lora_rank else "model"


def _write_export(
    path: Path, new: str, config: TrainConfig, trained: torch.nn.Module, models: dict,
    preset: Preset, dtype: str, record: str,
) -> Path:  # fmt: skip
    """A run's trained network as the file its end writes, never over a file (errors name the
    option `new`): the model with `models`' VAE and text encoders, the LoRA (fp32, diffusers'
    format) or the ControlNet (with the base model's preset)."""
    if config.controlnet_blocks:
        # the base model's preset goes with it: how the model it serves is sampled
        meta = {PRESET_METADATA: json.dumps(asdict(preset)), "sd3_training": record}
        return save_controlnet(path, trained, "canny", DTYPE_NAMES[dtype], meta, new=new)
    if config.lora_rank:
        return save_lora(path, trained, new=new)
    components = dict(models) | {"mmdit": trained}
    return export_single_file(path, components, dtype, {"sd3_training": record}, new=new)


# --- sd3 train export RUN OUT ----------------------------------------------------------------


def export_run(run: Path, out: Path, dtype: str | None = None, ema: bool = True) -> Path:
    """What a run's checkpoint (sharded or not) holds, as the file the run's end writes (the EMA
    where the run keeps one and `ema`): its model in the official layout (the MMDiT with the
    run's VAE and text encoders), its LoRA or its ControlNet."""
    path, state = run_state(run)
    if path is None:
        raise ValueError(f"RUN {run}: no {CHECKPOINT} or {sharded.SHARDED} in it")
    saved = (
        state.get("metadata", {}).get("args") if isinstance(state.get("metadata"), dict) else None
    )
    if not isinstance(saved, dict) or not isinstance(state.get("config"), dict):
        raise ValueError(f"RUN {run}: {path} was not written by `sd3 train`")
    config = TrainConfig.from_dict(state["config"])
    if out.suffix != ".safetensors":
        raise ValueError(f"OUT {out}: sd3 writes models as .safetensors files")
    check_new_file(out, "OUT")
    dtype = dtype or saved.get("export_dtype") or "fp32"

    def given(name: str) -> Path | None:
        return Path(saved[name]) if saved.get(name) else None

    if saved.get("init_config"):
        found = find_components(run / BASE, vae=given("vae"))
    else:
        found = find_components(given("model"))
        found.update(find_components(None, given("clip_l"), given("clip_g"), given("t5xxl"), given("vae")))  # fmt: skip
    models = {name: load_component(comp) for name, comp in found.items()}
    mmdit = models["mmdit"]
    preset = preset_for(mmdit.config, str(saved.get("model") or ""), found["mmdit"].metadata)
    if config.controlnet_blocks:
        trained, prefix = controlnet_from_base(mmdit, config.controlnet_blocks), "controlnet."
        weights = trained.state_dict()
    elif config.lora_rank:
        add_lora(mmdit, config.lora_rank, config.lora_alpha, config.lora_targets)
        trained, prefix, weights = mmdit, "mmdit.", lora_weights(mmdit)
    else:
        trained, prefix, weights = mmdit, "mmdit.", mmdit.state_dict()
    if path.is_dir():
        sharded.load_for_export(path, weights, prefix, ema)
    else:
        tensors, _ = load_checkpoint(path)
        with torch.no_grad():
            for name, t in weights.items():
                kept = tensors.get(f"ema.{prefix}{name}") if ema else None
                kept = kept if kept is not None else tensors.get(f"params.{prefix}{name}")
                if kept is not None:
                    t.copy_(kept)
    record = shared_record(state["step"], saved)
    return _write_export(out, "OUT", config, trained, models, preset, dtype, record)


def export_main(argv: list[str]) -> int:
    """`sd3 train export RUN OUT.safetensors`."""
    parser = argparse.ArgumentParser(
        prog="sd3 train export",
        description="Write what a training run's checkpoint (sharded or not) holds as the file "
        "the run's end writes: the model in Stability's single-file layout, the LoRA or the "
        "ControlNet. Never overwrites OUT.",
    )
    parser.add_argument("run", metavar="RUN", type=Path, help="the run's --out folder")
    parser.add_argument("out", metavar="OUT", type=Path, help="the new .safetensors file")
    parser.add_argument(
        "--dtype", choices=list(DTYPE_NAMES), help="default: the run's --export-dtype"
    )
    parser.add_argument("--no-ema", action="store_true", help="the trained weights, not their EMA")
    args = parser.parse_args(argv)

    def work() -> int:
        written = export_run(args.run, args.out, args.dtype, not args.no_ema)
        print(written)
        return 0

    return guarded("train export", work)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["export"]:
        return export_main(argv[1:])
    parser = argparse.ArgumentParser(prog="sd3 train", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
