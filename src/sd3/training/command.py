"""`sd3 train`: fine-tune or train from scratch an SD3 / SD3.5 model with rectified flow.

    sd3 train --model sd3.5_medium.safetensors --data pictures/ --out run1 --lora-rank 16
    sd3 train --init-config small --shapes 20000 --resolution 64 --out shapes --bf16
    sd3 train --out shapes --resume                      # continue where it stopped
    torchrun --nproc_per_node 4 -m sd3.training.command ...   # data-parallel (DDP)

Writes into --out: checkpoint.safetensors (every --checkpoint-every steps), log.jsonl, and at the
end model.safetensors (Stability's single-file layout, EMA weights) or lora.safetensors
(diffusers' SD3 LoRA format). A fresh --init-config model is first saved as base.safetensors.
"""

import argparse
import datetime
import json
import os
import sys
from dataclasses import fields
from pathlib import Path

import torch
import torch.distributed as dist

from sd3.checkpoints import DTYPE_NAMES, find_components, load_component
from sd3.text import TextEncoders

from .checkpoint import read_state
from .data import ImageCaptionFolder, cached_latents, check_pairs, load_latents
from .export import export_single_file, save_lora
from .flow import SAMPLINGS
from .fresh import INIT_CONFIGS, fresh_models
from .lora import DEFAULT_TARGETS
from .trainer import CHECKPOINT, TrainConfig, Trainer

# options that may differ on --resume (everything else comes from the checkpoint)
RESUMABLE = {
    "out", "resume", "steps", "checkpoint_every", "device", "export_dtype", "quiet", "threads",
}  # fmt: skip


def mix_argument(text: str) -> dict[str, float]:
    """argparse type of a shapes caption mix ("kind=weight,..."), its error naming the option."""
    from sd3.shapes.scenes import parse_mix

    try:
        return parse_mix(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _int_at_least(low: int):
    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    return parse


def _float_in(low: float, high: float, low_open: bool = False):
    def parse(text: str) -> float:
        value = float(text)
        if not (low < value if low_open else low <= value) or value > high:
            bracket = "(" if low_open else "["
            raise argparse.ArgumentTypeError(f"must be in {bracket}{low}, {high}], got {value}")
        return value

    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    inf = float("inf")
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
        "--shapes", type=_int_at_least(1), metavar="N", help="N procedural shape scenes"
    )
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
        "--resolution", type=_int_at_least(16), default=256, help="square size (multiple of 16)"
    )

    run = parser.add_argument_group("run")
    run.add_argument("--out", type=Path, required=True, help="output folder")
    run.add_argument(
        "--resume", action="store_true",
        help="continue from --out's checkpoint, with its settings (--steps may be raised)",
    )  # fmt: skip
    run.add_argument("--steps", type=_int_at_least(1), help="total optimizer steps (default 1000)")
    run.add_argument("--batch-size", type=_int_at_least(1), default=8, help="global batch size")
    run.add_argument("--checkpoint-every", type=_int_at_least(1), help="steps (default 500)")
    run.add_argument("--seed", type=_int_at_least(0), default=0)
    run.add_argument(
        "--device", help="default: cuda (cuda:LOCAL_RANK under torchrun) if available, else cpu"
    )
    run.add_argument(
        "--export-dtype", choices=list(DTYPE_NAMES), help="of model.safetensors (fp32)"
    )
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    run.add_argument(
        "--threads", type=_int_at_least(1),
        help="CPU threads per process (default: PyTorch's); 1 is often fastest on a busy machine",
    )  # fmt: skip

    opt = parser.add_argument_group("optimization")
    opt.add_argument("--lr", type=_float_in(0, inf, low_open=True), default=1e-4)
    opt.add_argument("--lr-schedule", choices=["constant", "cosine"], default="constant")
    opt.add_argument("--warmup-steps", type=_int_at_least(0), default=0)
    opt.add_argument("--weight-decay", type=_float_in(0, inf), default=0.0)
    opt.add_argument("--ema-decay", type=_float_in(0, 0.999999), default=0.999, help="0: no EMA")
    opt.add_argument("--grad-clip", type=_float_in(0, inf), default=1.0, help="0: no clipping")
    opt.add_argument("--bf16", action="store_true", help="bf16 autocast (fp32 weights)")
    opt.add_argument(
        "--grad-checkpointing", action="store_true", help="recompute joint blocks in backward"
    )
    opt.add_argument(
        "--compile", action="store_true",
        help="torch.compile the training step (a minute or two to compile; pays on long runs)",
    )  # fmt: skip

    flow = parser.add_argument_group("rectified flow")
    flow.add_argument("--timestep-sampling", choices=SAMPLINGS, default="logit_normal")
    flow.add_argument("--logit-mean", type=float, default=0.0)
    flow.add_argument("--logit-std", type=_float_in(0, inf, low_open=True), default=1.0)
    flow.add_argument("--mode-scale", type=_float_in(-1, 1.75), default=1.29)
    flow.add_argument("--shift", type=_float_in(0, inf, low_open=True), default=1.0)
    flow.add_argument(
        "--pair-contrast", type=_float_in(0, inf), default=0.0, metavar="W",
        help="with --shapes-mirror-pairs: extra weight on the difference of a pair's errors",
    )  # fmt: skip

    text = parser.add_argument_group("text encoders and LoRA")
    text.add_argument(
        "--text-dropout", type=_float_in(0, 1), default=0.1, help="per encoder and sample"
    )
    text.add_argument("--train-text-encoders", action="store_true", help="train them jointly")
    text.add_argument(
        "--text-encoder-lr", type=_float_in(0, inf, low_open=True),
        help="their peak learning rate, on the same schedule (default: --lr)",
    )  # fmt: skip
    text.add_argument(
        "--t5-length", type=_int_at_least(1),
        help="fixed T5 token count (default: as sampling, >= 77); a short one shortens the context "
        "and speeds training up; sample with the same t5_length",
    )  # fmt: skip
    text.add_argument("--lora-rank", type=_int_at_least(0), default=0, help="> 0: train LoRA only")
    text.add_argument("--lora-alpha", type=_float_in(0, inf, low_open=True), help="default: rank")
    text.add_argument(
        "--lora-targets", default=",".join(DEFAULT_TARGETS),
        help="comma-separated MMDiT layer-name suffixes, e.g. attn.qkv,attn.proj,mlp.fc1,mlp.fc2",
    )  # fmt: skip


def train_config(args: argparse.Namespace) -> TrainConfig:
    names = {f.name for f in fields(TrainConfig)}
    values = {k: v for k, v in vars(args).items() if k in names and v is not None}
    values["lora_targets"] = tuple(t.strip() for t in args.lora_targets.split(",") if t.strip())
    values["paired"] = args.shapes_mirror_pairs
    return TrainConfig(**values)


def _distributed(args: argparse.Namespace) -> tuple[int, int, torch.device]:
    """Join the torchrun job if there is one; returns (rank, world size, device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if args.device:
        device = torch.device(args.device)
    else:
        device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        # process 0 alone encodes the dataset while the others wait: allow it hours
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(hours=12))
    return (dist.get_rank(), dist.get_world_size(), device) if world > 1 else (0, 1, device)


def _load_models(args: argparse.Namespace, rank: int) -> dict:
    """The model family: from --model (+ separate files), or fresh (saved once as base.safetensors)."""
    if args.init_config:
        base = args.out / "base.safetensors"
        if rank == 0 and not base.is_file():
            export_single_file(base, fresh_models(args.init_config, args.seed))
        if dist.is_initialized():
            dist.barrier()
        found = find_components(base, vae=args.vae)
    else:
        found = find_components(args.model, args.clip_l, args.clip_g, args.t5xxl, args.vae)
    missing = [name for name in ("mmdit", "vae", "clip_l", "clip_g") if name not in found]
    if missing:
        raise ValueError(
            f"--model {args.model}: no {', '.join(missing)} found; pass a file that bundles them "
            "or the separate --vae / --clip-l / --clip-g files"
        )
    return {name: load_component(comp) for name, comp in found.items()}


def _dataset(args: argparse.Namespace):
    if args.data is not None:
        dataset = ImageCaptionFolder(args.data, args.resolution)
        return dataset, dataset.fingerprint()
    try:
        from sd3.shapes.scenes import ShapesDataset
    except ImportError as e:
        raise ValueError(f"--shapes: the shapes dataset is not available ({e})") from None
    mirror = args.shapes_mirror_pairs
    dataset = ShapesDataset(args.resolution, args.shapes, args.seed, args.shapes_mix, mirror)
    key = f"shapes:{args.shapes}:{args.resolution}:{args.seed}" + (
        ":mirror-pairs" if mirror else ""
    )
    if args.shapes_mix is not None:
        key += ":" + ",".join(f"{k}={w:.6g}" for k, w in dataset.mix.items())
    return dataset, key


def _latents(args, dataset, key: str, vae, rank: int, quiet: bool):
    """VAE latents of the dataset, cached in --out/latents.safetensors (computed by process 0)."""
    with torch.no_grad():
        vae_key = f"{sum(p.double().sum().item() for p in vae.encoder.parameters()):.10e}"
    cache, key = args.out / "latents.safetensors", {"data": key, "vae": vae_key}
    if rank == 0:
        progress = {"desc": "encoding images", "unit": "img", "disable": quiet}
        latents, captions = cached_latents(cache, dataset, vae, key, progress=progress)
    if dist.is_initialized():
        dist.barrier()
    return (latents, captions) if rank == 0 else load_latents(cache)


def _resume_args(args: argparse.Namespace, given: set[str]) -> argparse.Namespace:
    path = args.out / CHECKPOINT
    if not path.is_file():
        raise ValueError(f"--resume: no {CHECKPOINT} in {args.out}")
    saved = read_state(path).get("metadata", {}).get("args")
    if saved is None:
        raise ValueError(f"--resume: {path} was not written by `sd3 train`")
    merged = vars(args) | saved  # options added since the checkpoint keep their defaults
    for name in RESUMABLE & given:
        merged[name] = getattr(args, name)
    merged["steps"] = args.steps if args.steps is not None else saved["steps"]
    for k in ("model", "vae", "clip_l", "clip_g", "t5xxl", "data", "out"):
        merged[k] = Path(merged[k]) if merged[k] is not None else None
    return argparse.Namespace(**merged)


def _check_sources(args: argparse.Namespace) -> None:
    if (args.model is None) == (args.init_config is None):
        raise ValueError("give exactly one of --model FILE and --init-config NAME")
    if (args.data is None) == (args.shapes is None):
        raise ValueError("give exactly one of --data FOLDER and --shapes N")
    if args.shapes_mix is not None and args.shapes is None:
        raise ValueError("--shapes-mix applies to --shapes N only")
    if args.shapes_mirror_pairs:
        if args.shapes is None:
            raise ValueError("--shapes-mirror-pairs applies to --shapes N only")
        check_pairs(
            "--shapes-mirror-pairs needs",
            {"--shapes": args.shapes, "--batch-size": args.batch_size},
        )
    if args.pair_contrast and not args.shapes_mirror_pairs:
        raise ValueError("--pair-contrast needs --shapes-mirror-pairs (the pairs it contrasts)")
    if args.resolution % 16:
        raise ValueError(f"--resolution must be a multiple of 16, got {args.resolution}")


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"sd3 train: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # before or after the training loop, which handles Ctrl-C itself
        print(f"sd3 train: interrupted; checkpoints in {args.out} are intact", file=sys.stderr)
        return 130


def _run(args: argparse.Namespace) -> int:
    given = {k for k, v in vars(args).items() if v not in (None, False)}
    if args.resume:
        args = _resume_args(args, given)
    else:
        _check_sources(args)
        if (args.out / CHECKPOINT).is_file():
            raise ValueError(
                f"--out {args.out} already holds a checkpoint: pass --resume to continue it, or "
                "choose another folder"
            )
    args.steps = args.steps or 1000
    args.checkpoint_every = args.checkpoint_every or 500
    args.export_dtype = args.export_dtype or "fp32"
    config = train_config(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    rank, world, device = _distributed(args)
    quiet = args.quiet or rank != 0
    args.out.mkdir(parents=True, exist_ok=True)

    models = _load_models(args, rank)
    dataset, key = _dataset(args)
    if len(dataset) == 0:
        raise ValueError("the dataset is empty")
    latent_size = args.resolution // models["vae"].downscale
    models["mmdit"].check_size(latent_size, latent_size)  # before spending time on the VAE
    models["vae"].to(device)
    latents, captions = _latents(args, dataset, key, models["vae"], rank, quiet)
    models["vae"].cpu()
    mmdit = models["mmdit"].to(device)
    text_encoders = TextEncoders(
        models["clip_l"], models["clip_g"], models.get("t5xxl"),
        context_width=mmdit.config.context_dim, t5_length=args.t5_length,
    ).to(device)  # fmt: skip

    saved_args = {  # for --resume; leaves out what a surrounding CLI adds (e.g. its handler)
        k: str(v) if isinstance(v, Path) else v
        for k, v in vars(args).items()
        if v is None or isinstance(v, str | int | float | bool | Path)
    }
    trainer = Trainer(
        config, mmdit, text_encoders, latents, captions, args.out,
        metadata={"args": saved_args}, progress=not quiet,
    )  # fmt: skip
    if args.resume:
        trainer.resume()
        if rank == 0:
            print(f"resumed {args.out / CHECKPOINT} at step {trainer.step}", file=sys.stderr)
    step = trainer.train()
    if rank == 0:
        _export(args, trainer, models)
        print(
            f"step {step}: checkpoint {trainer.checkpoint_path}, log {args.out / 'log.jsonl'}",
            file=sys.stderr,
        )
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return 0


def _export(args: argparse.Namespace, trainer: Trainer, models: dict) -> None:
    with trainer.ema_weights():
        if trainer.config.lora_rank:
            path = save_lora(args.out / "lora.safetensors", trainer.mmdit)
        else:
            components = dict(models)
            components["mmdit"] = trainer.mmdit
            meta = {
                "sd3_training": json.dumps({"step": trainer.step, "args": trainer.metadata["args"]})
            }
            path = export_single_file(
                args.out / "model.safetensors", components, args.export_dtype, meta
            )
    print(f"saved {path}{' (EMA weights)' if trainer.ema else ''}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sd3 train", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
