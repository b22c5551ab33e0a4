"""Train one stage of the bundled default model (the recipe's first form, and the continuations
of its history with `--init`): a small model in the full SD3.5 architecture, on the procedural
shapes dataset, on a CPU, with sd3's own trainer. The whole recipe, every stage in one command, is
`scripts/train_default_model.py` (docs/default-model-recipe.md); the commands in
docs/default-model.md's history ran this script under that name.

    python scripts/train_one_stage.py --out runs/one

Stages (each resumable by re-running the same command):
1. the 16-channel VAE, trained on shape scenes (reconstruction + small KL), its latents then scaled
   to the MMDiT's latent format;
2. CLIP-L, CLIP-G and T5 with the real tokenizers, small and frozen at their random initialisation
   (every caption still gets a distinct, deterministic embedding; `--train-text-encoders` trains
   them with the MMDiT instead, which `scripts/compare_recipes.py text-encoders` found to fit
   better but bind colours worse on held-out prompts, docs/default-model.md). The model reads 24
   CLIP positions and 24 T5 tokens (the longest caption is 17 CLIP / 22 T5 tokens): a 48-token
   context instead of 77 + 32 makes a training step much faster, since at this size the context
   stream costs more than the 64 image tokens.
   `--pretrain-text-encoders STEPS` first trains them on the captions alone to state each
   caption's structure (`sd3.shapes.text_pretraining`), then freezes them;
3. an MMDiT-X (RMS qk-norm, attn2 in the first blocks) trained with the rectified-flow objective,
   logit-normal timestep sampling and a compiled training step at 128x128 (16x16 latents, 64 image
   tokens). At 64x64 the 8x latents leave a shape about one latent pixel wide: a VAE round trip of
   perfectly drawn scenes scores only 0.86 on `sd3 eval` there, and 1.00 at 128x128. An optional
   64x64 stage first (`--base-steps`, progressive resolution as in the SD3 paper) is off by
   default: the whole budget goes to the sampling size. `--mirror-pairs` trains on each scene
   next to its mirror image, whose caption names the relation's objects the other way round
   (`sd3.shapes.scenes.mirror`), the two in one batch with the same noise and timestep
   (`TrainConfig.paired`); `--pair-contrast W` weights what tells a pair apart more
   (`sd3.shapes.objective`). `--init FILE --reinit-mmdit` keeps FILE's VAE and text
   encoders and starts a fresh MMDiT on them. The EMA weights are exported in the official
   single-file layout (fp16).

Steps run under bf16 autocast where the CPU computes bf16 (AVX-512 BF16 or AMX), which keeps the
recipe within its two-hour budget on 2 cores, and in fp32 elsewhere, which takes longer
(docs/default-model.md has the times).

The result goes to `--export` (by default the package's `assets/default/sd3_shapes.safetensors`),
with a preset in its metadata, and the stage times and loss curve to `--out/record.json`.
"""

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import load_file

from sd3.checkpoints import load_component, open_file
from sd3.kernels.hardware import cpu_has_bf16
from sd3.models.mmdit import MMDiT
from sd3.models.vae import AutoEncoder
from sd3.presets import preset_for
from sd3.shapes.autoencoder import fit_latent_format, train_autoencoder
from sd3.shapes.bundled import CLIP_POSITIONS, HIRES, SIZE, T5_LENGTH, export, model_family
from sd3.shapes.scenes import ShapesDataset, heldout_prompts
from sd3.shapes.text_pretraining import pretrain_text_encoders, swap_cosine
from sd3.text import TextEncoders
from sd3.training.checkpoint import save_atomic
from sd3.training.command import mix_argument
from sd3.training.data import cached_latents, check_pairs
from sd3.training.flow import SAMPLINGS
from sd3.training.fresh import FamilyConfig, fresh_text_encoders, init_mmdit
from sd3.training.trainer import TrainConfig, Trainer

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_EXPORT = ROOT / "src" / "sd3" / "assets" / "default" / "sd3_shapes.safetensors"


class Stage(NamedTuple):
    """One MMDiT training stage: its image size, working folder, steps, peak lr and warm-up."""

    name: str
    size: int
    out: Path
    steps: int
    lr: float
    warmup: int


class Record(dict):
    """`--out/record.json`: the command (a re-run with other arguments keeps the earlier ones too),
    stage times and loss curves."""

    def __init__(self, path: Path, command: list[str]):
        super().__init__(json.loads(path.read_text()) if path.is_file() else {})
        self.path = path
        if self.get("command", command) != command:
            self.setdefault("earlier_commands", []).append(self["command"])
        self["command"] = command

    def save(self) -> None:
        self.path.write_text(json.dumps(self, indent=1))


def main() -> int:
    args = parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    record = Record(args.out / "record.json", sys.argv)
    family = model_family(args.hidden, args.depth)
    data = ShapesDataset(size=SIZE, length=args.scenes, seed=args.data_seed, mix=args.mix)
    init = open_file(args.init) if args.init else None

    # 1. the autoencoder
    vae = autoencoder(args, family, data, init, record)
    # 2. the text encoders (and the MMDiT), fresh or --init's; frozen at random init, or
    # pre-trained on the captions' structure
    encoders, model = fresh_networks(args, family)
    text = TextEncoders(
        encoders["clip_l"], encoders["clip_g"], encoders["t5xxl"],
        context_width=model.config.context_dim, t5_length=T5_LENGTH, clip_length=CLIP_POSITIONS,
    )  # fmt: skip
    if init is not None:
        kept = encoders if args.reinit_mmdit else {"mmdit": model, **encoders}
        for name, m in kept.items():
            m.load_state_dict(load_component(init[name]).state_dict())
    if args.pretrain_text_encoders:
        pretrained_text(args.out / "text_encoders.safetensors", text, encoders, args, record)
        record.save()
    # 3. the MMDiT, at 64x64 first if --base-steps, then at 128x128
    stages = mmdit_stages(args)
    for stage in stages:
        if not train_stage(stage, args, model, encoders, text, vae, record):
            return 130
    record["mmdit_params"] = sum(p.numel() for p in model.parameters())
    record.save()
    # 4. export: EMA weights, fp16, official layout, with the preset (its size is that of the last
    # stage, or the --init file's where no stage ran, e.g. to pre-train only the text encoders)
    size = (
        stages[-1].size
        if stages
        else preset_for(model.config, metadata=init["mmdit"].metadata).size
    )
    export(args.export, {"mmdit": model, "vae": vae, **encoders}, size)
    return 0


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="working folder (checkpoints, logs)")
    p.add_argument("--export", type=Path, default=DEFAULT_EXPORT)
    p.add_argument("--scenes", type=int, default=40_000, help="training scenes")
    p.add_argument("--vae-steps", type=int, default=1500)
    p.add_argument("--base-steps", type=int, default=0, help="MMDiT steps at 64x64 first")
    p.add_argument("--steps", type=int, default=7000, help="MMDiT optimizer steps at 128x128")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--hidden", type=int, default=192)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=200, help="lr warm-up steps")
    p.add_argument("--timestep-sampling", default="logit_normal", choices=SAMPLINGS)
    p.add_argument(
        "--logit-mean", type=float, default=0.0,
        help="logit-normal mean: above 0 spends more steps at high noise, where layout forms",
    )  # fmt: skip
    p.add_argument(
        "--train-text-encoders", action="store_true",
        help="train CLIP-L, CLIP-G and T5 with the MMDiT instead of freezing them at random init",
    )  # fmt: skip
    p.add_argument(
        "--text-encoder-lr", type=float,
        help="their peak learning rate with --train-text-encoders (default: --lr)",
    )  # fmt: skip
    p.add_argument(
        "--pretrain-text-encoders", type=int, default=0, metavar="STEPS",
        help="first train the frozen text encoders this many steps on the captions' structure "
        "(sd3.shapes.text_pretraining), then freeze them for the MMDiT",
    )  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--init", type=Path,
        help="continue from an exported model (e.g. the bundled one): its VAE, frozen text encoders "
        "and MMDiT weights replace the fresh ones, and stage 1 is skipped",
    )  # fmt: skip
    p.add_argument(
        "--reinit-mmdit", action="store_true",
        help="with --init: take its VAE and text encoders but start a fresh MMDiT (of --hidden and "
        "--depth), e.g. to test what the encoders let an MMDiT learn from scratch",
    )  # fmt: skip
    p.add_argument("--data-seed", type=int, help="seed of the training scenes (default: --seed)")
    p.add_argument(
        "--mix", type=mix_argument, metavar="KIND=W,...",
        help="shares of the caption kinds (single, counting, pair, position, group); default "
        "20/20/20/25/15 percent",
    )  # fmt: skip
    p.add_argument(
        "--mirror-pairs", action="store_true",
        help="train on scenes next to their mirror images (a relation's objects swapped in image "
        "and caption), each pair in one batch with the same noise and timestep",
    )  # fmt: skip
    p.add_argument(
        "--pair-contrast", type=float, default=0.0, metavar="W",
        help="with --mirror-pairs: extra weight on the difference of a pair's errors (flow_loss)",
    )  # fmt: skip
    args = p.parse_args()
    if args.pair_contrast and not args.mirror_pairs:
        p.error("--pair-contrast needs --mirror-pairs")
    if args.mirror_pairs:
        try:
            check_pairs(
                "--mirror-pairs needs", {"--scenes": args.scenes, "--batch-size": args.batch_size}
            )
        except ValueError as e:
            p.error(str(e))
    if args.reinit_mmdit and not args.init:
        p.error("--reinit-mmdit needs --init (the file whose VAE and text encoders to keep)")
    if args.pretrain_text_encoders < 0:
        p.error(f"--pretrain-text-encoders must be >= 0 steps, got {args.pretrain_text_encoders}")
    if not (args.steps or args.base_steps or (args.init and not args.reinit_mmdit)):
        p.error("--steps and --base-steps are both 0 and there is no --init (or --reinit-mmdit "
                "discards its MMDiT): nothing would train or load the MMDiT")  # fmt: skip
    if args.data_seed is None:
        args.data_seed = args.seed
    return args


def autoencoder(
    args: argparse.Namespace, family: FamilyConfig, data: ShapesDataset, init, record: Record
) -> AutoEncoder:
    """The VAE: the --init file's, or trained on the scenes (cached in --out/vae.safetensors),
    frozen."""
    vae_file = args.out / "vae.safetensors"
    vae = AutoEncoder(family.vae)
    if init is not None:
        vae.load_state_dict(load_component(init["vae"]).state_dict())
    elif vae_file.is_file():
        vae.load_state_dict(load_file(str(vae_file)))
    else:
        started = time.perf_counter()
        losses = train_autoencoder(
            vae, data, steps=args.vae_steps, batch_size=32, lr=1e-3, seed=args.seed
        )
        images = torch.stack([data[i][0] for i in range(512)])
        fit_latent_format(vae, images)
        save_atomic(vae_file, {k: v.contiguous() for k, v in vae.state_dict().items()})
        record["vae"] = {"seconds": round(time.perf_counter() - started), "steps": args.vae_steps,
                         "loss_first": losses[0], "loss_last_100": sum(losses[-100:]) / 100}  # fmt: skip
        record.save()
    return vae.eval().requires_grad_(False)


def fresh_networks(
    args: argparse.Namespace, family: FamilyConfig
) -> tuple[dict[str, torch.nn.Module], MMDiT]:
    """The text encoders (seeded --seed + 1) and the MMDiT (--seed + 2), freshly initialised."""
    torch.manual_seed(args.seed + 1)
    encoders = fresh_text_encoders(family)
    torch.manual_seed(args.seed + 2)
    return encoders, init_mmdit(MMDiT(family.mmdit))


def pretrained_text(
    path: Path, text: TextEncoders, encoders: dict, args: argparse.Namespace, record: Record
) -> None:
    """The text encoders after `--pretrain-text-encoders` steps, cached in `path`."""
    if path.is_file():
        weights = load_file(str(path))
        for name, m in encoders.items():
            m.load_state_dict({k.removeprefix(f"{name}."): v for k, v in weights.items()
                               if k.startswith(f"{name}.")})  # fmt: skip
        return
    started = time.perf_counter()
    heldout = [p.text for p in heldout_prompts()]
    before = swap_cosine(text, heldout)
    report = pretrain_text_encoders(
        text, args.pretrain_text_encoders, heldout, mix=args.mix, seed=args.seed
    )
    weights = {
        f"{n}.{k}": v.contiguous() for n, m in encoders.items() for k, v in m.state_dict().items()
    }
    save_atomic(path, weights)
    record["text_pretraining"] = {
        **asdict(report), "swap_cosine_before": before,
        "seconds": round(time.perf_counter() - started),
    }  # fmt: skip


def mmdit_stages(args: argparse.Namespace) -> list[Stage]:
    """--base-steps at 64x64 in --out, then --steps at 128x128 in --out/hires (at half the peak lr
    and warm-up after a 64x64 stage); stages of 0 steps are left out."""
    stages = [
        Stage("base", SIZE, args.out, args.base_steps, args.lr, args.warmup),
        Stage("hires", HIRES, args.out / "hires", args.steps, args.lr / 2, args.warmup // 2)
        if args.base_steps
        else Stage("hires", HIRES, args.out / "hires", args.steps, args.lr, args.warmup),
    ]
    return [stage for stage in stages if stage.steps > 0]  # --steps 0: 64x64 only


def train_stage(
    stage: Stage,
    args: argparse.Namespace,
    model: MMDiT,
    encoders: dict[str, torch.nn.Module],
    text: TextEncoders,
    vae: AutoEncoder,
    record: Record,
) -> bool:
    """Train (or resume) one stage on the latents of its scenes; on success the networks hold its
    EMA weights (where the next stage starts). False if it stopped early (Ctrl-C)."""
    name, size, out, steps, lr, warmup = stage
    out.mkdir(parents=True, exist_ok=True)
    data = ShapesDataset(size, args.scenes, args.data_seed, args.mix, args.mirror_pairs)
    latents, captions = scene_latents(
        out / "latents.safetensors", data, vae, record, f"{name}_latents_seconds"
    )
    config = TrainConfig(
        steps=steps, batch_size=args.batch_size, lr=lr, lr_schedule="cosine", warmup_steps=warmup,
        timestep_sampling=args.timestep_sampling, logit_mean=args.logit_mean, ema_decay=0.999,
        grad_clip=1.0, text_dropout=0.1,
        bf16=cpu_has_bf16(), compile=True, checkpoint_every=250, seed=args.seed,
        train_text_encoders=args.train_text_encoders, text_encoder_lr=args.text_encoder_lr,
        paired=args.mirror_pairs, pair_contrast=args.pair_contrast,
    )  # fmt: skip
    trainer = Trainer(config, model, text, latents, captions, out, metadata={"recipe": sys.argv})
    if trainer.checkpoint_path.is_file():
        trainer.resume()
    started = time.perf_counter()
    step = trainer.train()
    record[f"{name}_mmdit_seconds"] = record.get(f"{name}_mmdit_seconds", 0) + round(
        time.perf_counter() - started
    )
    if step < config.steps:
        print(f"stopped at step {step}; re-run the same command to continue", file=sys.stderr)
        record.save()
        return False
    record[f"{name}_loss_curve"] = loss_curve(out / "log.jsonl")
    record.save()
    trained = [model, *encoders.values()]
    with trainer.ema_weights():  # the next stage starts from this one's EMA weights
        ema = [{k: v.clone() for k, v in m.state_dict().items()} for m in trained]
    for m, weights in zip(trained, ema, strict=True):
        m.load_state_dict(weights)
    return True


def scene_latents(
    path: Path, data: ShapesDataset, vae: AutoEncoder, record: Record, key: str
) -> tuple[torch.Tensor, list[str]]:
    """The VAE latents and captions of every scene, cached in `path` (the seconds it took to encode
    them in record[key])."""
    started, cached = time.perf_counter(), path.is_file()
    progress = {"desc": f"encoding {data.size}px scenes", "unit": "scene"}
    latents, captions = cached_latents(path, data, vae, batch_size=32, progress=progress)
    if not cached:
        record[key] = round(time.perf_counter() - started)
    return latents, captions


def loss_curve(log_file: Path, points: int = 40) -> list[list[float]]:
    """[step, mean loss] at `points` evenly spaced windows of the trainer's loss log."""
    log = [json.loads(line) for line in log_file.read_text().splitlines()]
    every = max(1, len(log) // points)
    windows = [log[i : i + every] for i in range(0, len(log), every)][:points]
    return [[w[0]["step"], round(sum(e["loss"] for e in w) / len(w), 4)] for w in windows]


if __name__ == "__main__":
    sys.exit(main())
