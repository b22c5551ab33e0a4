"""Train the bundled default model from nothing, every stage of its recipe in one command: a small
model in the full SD3.5 architecture, on the procedural shapes dataset, on a CPU, with sd3's own
trainer.

    python scripts/train_default_model.py --out runs/default

The stages (`STAGES`, below; docs/default-model-recipe.md says what each is for) are what the
chain of runs in docs/default-model.md taught, in order: the text encoders pre-trained on the
captions' structure and layout (`sd3.shapes.text_pretraining`), the VAE, then MMDiT stages, 64x64
on position scenes alone alternating with 128x128 on the curriculum's caption mix, every one on
new scenes, then the VAE's decoder at 128x128 and a canny ControlNet for the finished model.
Each stage's seeds derive from `--seed` and its index, so a run is a function of its
settings. Each stage writes its weights and then, atomically, a `done.json` marker in
`--out/<stage>/`; re-running the same command (or with `--resume`) skips the stages done (reading
only the latest weights of each kind) and continues an MMDiT stage at its trainer's last
checkpoint (every 250 steps). Changed settings are
refused, except in stages not started yet. `--out/record.json` holds, per stage, its wall time,
final loss, images/s and machine. The EMA weights go to `--export` (official single-file layout,
fp16, the preset in its metadata), the ControlNet's beside it (`controlnet_export`).
"""

import argparse
import json
import os
import platform
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from tqdm import tqdm

from sd3.checkpoints import load_component, open_file
from sd3.kernels.hardware import cpu_flags, cpu_has_amx, cpu_has_bf16
from sd3.models.mmdit import MMDiT
from sd3.models.vae import AutoEncoder
from sd3.presets import PRESET_METADATA
from sd3.shapes.autoencoder import fit_latent_format, measure_reconstruction, train_autoencoder
from sd3.shapes.bundled import (
    CLIP_POSITIONS,
    CURRICULUM_MIX,
    HIRES,
    POSITION_MIX,
    PRESET,
    SIZE,
    T5_LENGTH,
    export,
    model_family,
)
from sd3.shapes.scenes import ShapesDataset, heldout_prompts, parse_mix
from sd3.shapes.text_pretraining import pretrain_text_encoders
from sd3.text import TextEncoders
from sd3.training.checkpoint import save_atomic
from sd3.training.controlnet import control_encoder, save_controlnet, shapes_edges
from sd3.training.data import cached_latents
from sd3.training.fresh import fresh_text_encoders, init_mmdit
from sd3.training.trainer import TrainConfig, Trainer

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_EXPORT = ROOT / "src" / "sd3" / "assets" / "default" / "sd3_shapes.safetensors"
DONE = "done.json"  # a stage's marker, written atomically once its weights are saved
CONTROLNET_BLOCKS = 2  # the bundled ControlNet's blocks: outputs after the MMDiT's blocks 0-2, 3-5


@dataclass(frozen=True)
class Stage:
    """One stage of the recipe: `kind` "text" (pre-train the text encoders on `scenes` captions),
    "vae" (train the autoencoder on `scenes` scenes at `size`), "decoder" (train its decoder
    alone, at `size`: the latents stay the ones the MMDiT learned), "mmdit" (encode `scenes` new
    scenes at `size` with the `mix` of caption kinds, then train the MMDiT on them) or
    "controlnet" (a canny ControlNet of `CONTROLNET_BLOCKS` blocks for the finished model, trained
    on `scenes` new scenes at `size` with their edges as control images)."""

    name: str
    kind: str
    steps: int
    batch: int
    scenes: int
    lr: float
    size: int = 0
    mix: str = ""
    warmup: int = 0  # MMDiT: linear lr warm-up steps, then cosine to 0 (ControlNet: constant)
    logit_mean: float = 0.5  # MMDiT: logit-normal timestep sampling, more steps at high noise
    heldout: int = 0  # text: about how many held-out prompts its report reads (0: all 224);
    # decoder: how many held-out scenes measure its reconstruction


def text(steps: int, batch: int = 256, captions: int = 20_000, heldout: int = 0) -> Stage:
    """Text encoders pre-trained on the curriculum's captions (read-out of groups and layout)."""
    return Stage("text", "text", steps, batch, captions, 1e-3, mix=CURRICULUM_MIX, heldout=heldout)


def vae(steps: int, batch: int = 32, scenes: int = 20_000) -> Stage:
    """The 16-channel VAE at 64x64 (the standard caption mix), then its latent format fitted."""
    return Stage("vae", "vae", steps, batch, scenes, lr=1e-3, size=SIZE)


def decoder(steps: int, batch: int = 8, scenes: int = 20_000, heldout: int = 256) -> Stage:
    """The VAE's decoder alone at 128x128, the sampling size (the 64x64 VAE drew soft edges and
    pale blobs beside the objects there); `heldout` scenes measure it before and after."""
    return Stage("decoder", "decoder", steps, batch, scenes, 3e-4, size=HIRES, heldout=heldout)


def controlnet(steps: int, batch: int = 24, scenes: int = 2_400) -> Stage:
    """A canny ControlNet for the finished model at 128x128, the model frozen, on new scenes
    (the standard caption mix) whose edges are the control images (docs/controlnet.md)."""
    return Stage("controlnet", "controlnet", steps, batch, scenes, 3e-4, size=HIRES, warmup=30)


def position(n: int, steps: int, warmup: int, batch: int = 64, scenes: int = 16_000) -> Stage:
    """MMDiT at 64x64 on position scenes alone: it must relearn its grid, and learns order."""
    return Stage(f"position-{n}", "mmdit", steps, batch, scenes, 5e-4, SIZE, POSITION_MIX, warmup)


def mixed(n: int, steps: int, warmup: int, batch: int = 64, scenes: int = 32_000) -> Stage:
    """MMDiT at 128x128 (the sampling size) on the curriculum's caption mix."""
    return Stage(f"mixed-{n}", "mmdit", steps, batch, scenes, 5e-4, HIRES, CURRICULUM_MIX, warmup)


# The recipe. Budget on 2 CPU cores with bf16 (`budget_minutes`, from the rates below; the
# chain's own stages ran at these rates, docs/default-model.md):
#   stage        what                                         steps   budget
#   text         text encoders on 20,000 captions             2,000   15.0 min
#   vae          VAE on 20,000 scenes, 64x64                     600   16.0
#   position-1   16,000 position scenes, 64x64                 2,000   14.5 (1 latents + 1 + 12.5)
#   mixed-1      40,000 scenes, 128x128                        7,500   95.2 (10 + 1 + 84.2)
#   position-2   16,000 position scenes                        1,500   11.4 (1 + 1 + 9.4)
#   mixed-2      32,000 scenes                                 3,000   42.7 (8 + 1 + 33.7)
#   position-3..6                                              1,500   11.4 each
#   mixed-3      32,000 scenes                                 1,500   25.8 (8 + 1 + 16.8)
#   mixed-4..9   32,000 scenes each                            1,000   20.2 each
#   decoder      VAE decoder alone, 20,000 scenes, 128x128       600    8.8
#   controlnet   canny ControlNet, 2,400 scenes, 128x128        1,173    8.9 (1.2 + 1 + 6.7)
#   total                                                             405 min (6.8 hours)
# Every stage draws new scenes (its own seed); the 128x128 stages do because the chain found fresh
# scenes, not a re-weighted mix, lifted the last 128x128 stage (0.863 against 0.814).
STAGES = (
    text(steps=2000),
    vae(steps=600),
    position(1, steps=2000, warmup=200),
    mixed(1, steps=7500, warmup=200, scenes=40_000),
    position(2, steps=1500, warmup=100),
    mixed(2, steps=3000, warmup=200),
    position(3, steps=1500, warmup=100),
    mixed(3, steps=1500, warmup=100),
    position(4, steps=1500, warmup=100),
    mixed(4, steps=1000, warmup=100),
    position(5, steps=1500, warmup=100),
    mixed(5, steps=1000, warmup=100),
    position(6, steps=1500, warmup=100),
    mixed(6, steps=1000, warmup=100),
    mixed(7, steps=1000, warmup=100),
    mixed(8, steps=1000, warmup=100),
    mixed(9, steps=1000, warmup=100),
    decoder(steps=600),
    controlnet(steps=1173),
)
# `--quick`: the same kinds of stage in the same order, a few steps each on a few scenes (tests)
QUICK = (
    text(steps=2, batch=8, captions=32, heldout=8),
    vae(steps=1, batch=2, scenes=4),
    position(1, steps=2, warmup=1, batch=4, scenes=8),
    mixed(1, steps=3, warmup=1, batch=4, scenes=8),
    position(2, steps=2, warmup=1, batch=4, scenes=8),
    mixed(2, steps=2, warmup=1, batch=4, scenes=8),
    decoder(steps=1, batch=2, scenes=4, heldout=4),
    controlnet(steps=2, batch=2, scenes=4),
)

# Rates for the budget, 2 cores with bf16 (docs/default-model.md's stage table)
IMAGES_PER_S = {SIZE: 170, HIRES: 95}  # MMDiT training, compiled, batch 64
SCENES_PER_MIN = {SIZE: 16_000, HIRES: 4_000}  # scenes rendered and encoded to latents
TEXT_STEP_S = 0.45  # text pre-training, batch 256
VAE_STEP_S = 1.6  # VAE, batch 32 at 64x64
DECODER_SHARE = 0.55  # of a VAE step's time that training the decoder alone takes
CONTROLNET_IMAGES_PER_S = 70  # ControlNet training at 128x128, compiled, batch 24
MMDIT_START_MIN = 1.0  # per MMDiT stage: compiling the step, encoding the captions


def budget_minutes(stage: Stage) -> tuple[float, float]:
    """(minutes preparing, minutes training) that `stage` is budgeted at the rates above."""
    if stage.kind == "text":
        return 0.0, stage.steps * TEXT_STEP_S * stage.batch / 256 / 60
    if stage.kind == "controlnet":  # its scenes encoded twice: images and edges
        prepare = 2 * stage.scenes / SCENES_PER_MIN[stage.size] + MMDIT_START_MIN
        return prepare, stage.steps * stage.batch / CONTROLNET_IMAGES_PER_S / 60
    if stage.kind in ("vae", "decoder"):
        pixels = stage.batch * stage.size**2 / (32 * SIZE**2)
        share = 1.0 if stage.kind == "vae" else DECODER_SHARE
        return 0.0, stage.steps * VAE_STEP_S * pixels * share / 60
    prepare = stage.scenes / SCENES_PER_MIN[stage.size] + MMDIT_START_MIN
    return prepare, stage.steps * stage.batch / IMAGES_PER_S[stage.size] / 60


def what(stage: Stage) -> str:
    """A stage in words, for the budget table."""
    if stage.kind == "text":
        return f"text encoders on {stage.scenes:,} captions' structure and layout"
    if stage.kind == "vae":
        return f"VAE on {stage.scenes:,} scenes at {stage.size}x{stage.size}"
    if stage.kind == "controlnet":
        return f"canny ControlNet on {stage.scenes:,} new scenes at {stage.size}x{stage.size}"
    if stage.kind == "decoder":
        return f"VAE decoder alone on {stage.scenes:,} new scenes at {stage.size}x{stage.size}"
    kinds = "position scenes" if stage.mix == POSITION_MIX else "scenes, curriculum mix"
    return f"MMDiT, {stage.scenes:,} new {kinds} at {stage.size}x{stage.size}"


def stage_seed(seed: int, index: int) -> int:
    """The seed of stage `index`'s scenes and training: a function of the recipe's seed and the
    index only, decorrelated across both."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def main() -> int:
    args = parse_args()
    stages = QUICK if args.quick else STAGES
    if args.init:  # the file brings the text encoders and the VAE
        stages = tuple(s for s in stages if s.kind in ("mmdit", "controlnet"))
    if args.stop_after is not None and args.stop_after not in {s.name for s in stages}:
        names = ", ".join(s.name for s in stages)
        print(f"error: --stop-after {args.stop_after}: no such stage ({names})", file=sys.stderr)
        return 2
    settings = {
        "seed": args.seed, "quick": args.quick, "hidden": args.hidden, "depth": args.depth,
        "fp32": args.fp32 or args.quick, "init": str(args.init) if args.init else None,
        "reinit_mmdit": args.reinit_mmdit, "stages": [asdict(s) for s in stages],
    }  # fmt: skip
    problem = check_recipe(args.out, settings, args.resume)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    print_budget(stages)
    run = Run(args, settings)
    progress = Progress(stages)
    replaced = superseded(args.out, stages)
    try:
        for index, stage in enumerate(stages):
            folder = args.out / stage.name
            progress.begin(index, stage)
            if (folder / DONE).is_file():
                if index not in replaced:
                    run.load(stage, folder)
            else:
                folder.mkdir(parents=True, exist_ok=True)
                started = time.perf_counter()
                result = TRAIN[stage.kind](
                    stage, stage_seed(args.seed, index), folder, run, progress
                )
                if result is None:  # Ctrl-C: the trainer saved its checkpoint
                    print(f"stopped in stage {stage.name}; re-run the same command to continue",
                          file=sys.stderr)  # fmt: skip
                    return 130
                seconds = time.perf_counter() - started + result.pop("earlier_seconds", 0.0)
                record = {"stage": stage.name, "index": index, "kind": stage.kind,
                          "what": what(stage), "steps": stage.steps,
                          "budget_minutes": round(sum(budget_minutes(stage)), 1),
                          "seconds": round(seconds, 1), **result,
                          "precision": "bf16" if run.bf16 else "fp32", "machine": machine()}  # fmt: skip
                write_json(folder / DONE, record)
                write_record(args.out, stages)
            progress.end(index)
            if stage.name == args.stop_after:
                print(f"stopped after stage {stage.name} (--stop-after)", file=sys.stderr)
                return 0
    finally:
        progress.close()
    size = next(s.size for s in reversed(stages) if s.kind == "mmdit")
    export(args.export, {"mmdit": run.mmdit, "vae": run.vae, **run.encoders}, size)
    if run.controlnet is not None:
        shutil.copyfile(run.controlnet, controlnet_export(args.export))
        print(f"exported {controlnet_export(args.export)}", file=sys.stderr)
    return 0


def superseded(out: Path, stages: tuple[Stage, ...]) -> set[int]:
    """The finished stages whose weights a later finished stage replaces (an MMDiT stage's by the
    next one's, the VAE's by the decoder's): a resumed run does not read them, so a kept run needs
    only its latest weights of each kind."""
    done = [(out / s.name / DONE).is_file() for s in stages]
    return {
        i for i, s in enumerate(stages)
        if done[i] and any(done[j] and OUTPUT[t.kind] == OUTPUT[s.kind]
                           for j, t in enumerate(stages[i + 1 :], i + 1))
    }  # fmt: skip


def controlnet_export(export: Path) -> Path:
    """Where the ControlNet goes: beside the model, named after it (the bundled model's
    sd3_shapes.safetensors: sd3_shapes_controlnet_canny.safetensors, what `shapes-canny` names)."""
    return export.with_name(f"{export.stem}_controlnet_canny{export.suffix}")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="working folder (stages, record.json)")
    p.add_argument("--export", type=Path, default=DEFAULT_EXPORT,
                   help="the exported model (its ControlNet goes beside it, named "
                   "<stem>_controlnet_canny.safetensors)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="the recipe's seed (every stage's derives)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out (re-running the same command does too), or "
                   "fail if there is none")  # fmt: skip
    p.add_argument("--stop-after", metavar="STAGE", help="stop after this stage (no export)")
    p.add_argument("--quick", action="store_true",
                   help="a few steps per stage on a few scenes, fp32, eager (tests)")  # fmt: skip
    p.add_argument("--fp32", action="store_true",
                   help="train in fp32 even where the CPU computes bf16 (slower)")  # fmt: skip
    p.add_argument("--hidden", type=int, help="MMDiT width (default 192, --quick 64)")
    p.add_argument("--depth", type=int, help="MMDiT depth (default 6, --quick 2)")
    p.add_argument("--init", type=Path,
                   help="an exported model whose text encoders, VAE and MMDiT replace the fresh "
                   "ones: only the MMDiT stages run")  # fmt: skip
    p.add_argument("--reinit-mmdit", action="store_true",
                   help="with --init: keep its text encoders and VAE, start a fresh MMDiT")  # fmt: skip
    args = p.parse_args()
    if args.reinit_mmdit and not args.init:
        p.error("--reinit-mmdit needs --init (the file whose VAE and text encoders to keep)")
    if args.seed < 0:
        p.error(f"--seed must be >= 0, got {args.seed}")
    args.hidden = args.hidden or (64 if args.quick else 192)
    args.depth = args.depth or (2 if args.quick else 6)
    return args


def check_recipe(out: Path, settings: dict, resume: bool) -> str | None:
    """Write the settings to `out/recipe.json` on a first run; on a later one, the first setting
    that differs from the file's (in words), or None if the run can go on. Stages not started yet
    (no folder in `out`) may differ: they have not touched the run, so it goes on as the edited
    recipe would have from the beginning, and the file is rewritten with it."""
    path = out / "recipe.json"
    if not path.is_file():
        if resume:
            return f"--resume: {out} holds no run to continue (no recipe.json)"
        out.mkdir(parents=True, exist_ok=True)
        write_json(path, settings)
        return None
    before = json.loads(path.read_text())
    for key in settings:
        if key == "stages":
            continue
        if before.get(key) != settings[key]:
            return (f"{out} holds a run with {key}={before.get(key)!r}, this command has "
                    f"{key}={settings[key]!r}: use the same settings to continue it, or another --out")  # fmt: skip
    old, new = before["stages"], settings["stages"]
    for i in range(max(len(old), len(new))):
        a, b = (old[i] if i < len(old) else None), (new[i] if i < len(new) else None)
        if a != b and a is not None and (out / a["name"]).exists():
            changed = (next(k for k in a if a[k] != b.get(k)) if b and a["name"] == b["name"]
                       else "name")  # fmt: skip
            return (f"{out} holds a run whose stage {i + 1} ({a['name']}, started) has "
                    f"{changed}={a.get(changed)!r}, the recipe now has {(b or {}).get(changed)!r}: "
                    "continue it with the script it started with, or use another --out")  # fmt: skip
    if old != new:
        print(f"the recipe's stages changed after the last one {out} started; going on with them",
              file=sys.stderr)  # fmt: skip
        write_json(path, settings)
    return None


def print_budget(stages: tuple[Stage, ...]) -> None:
    """The per-stage time budget, up front."""
    rows = [(f"{i + 1}. {s.name}", what(s), f"{s.steps:,}", sum(budget_minutes(s)))
            for i, s in enumerate(stages)]  # fmt: skip
    total = sum(r[3] for r in rows)
    width = max(len(r[1]) for r in rows)
    lines = [f"{'stage':14} {'what':{width}} {'steps':>6} {'budget':>9}"]
    lines += [f"{a:14} {b:{width}} {c:>6} {d:7.1f} m" for a, b, c, d in rows]
    lines.append(
        f"{'total':14} {'':{width}} {'':>6} {total:7.1f} m ({total / 60:.1f} h, 2 cores bf16)"
    )
    print("\n".join(lines), file=sys.stderr)


class Run:
    """The networks the stages train, fresh from the recipe's seed (or --init's), and where the
    recipe trains them (bf16 or fp32, compiled or eager)."""

    def __init__(self, args: argparse.Namespace, settings: dict):
        family = model_family(args.hidden, args.depth)
        self.bf16 = cpu_has_bf16() and not settings["fp32"]
        self.compile = not args.quick
        torch.manual_seed(args.seed)
        self.vae = AutoEncoder(family.vae)
        torch.manual_seed(args.seed + 1)
        self.encoders = fresh_text_encoders(family)
        torch.manual_seed(args.seed + 2)
        self.mmdit = init_mmdit(MMDiT(family.mmdit))
        self.controlnet: Path | None = None  # the ControlNet stage's file, once trained
        if args.init:
            init = open_file(args.init)
            kept = {"vae": self.vae, **self.encoders}
            if not args.reinit_mmdit:
                kept["mmdit"] = self.mmdit
            for name, m in kept.items():
                m.load_state_dict(load_component(init[name]).state_dict())
        self.text = TextEncoders(
            self.encoders["clip_l"], self.encoders["clip_g"], self.encoders["t5xxl"],
            context_width=self.mmdit.config.context_dim, t5_length=T5_LENGTH,
            clip_length=CLIP_POSITIONS,
        )  # fmt: skip
        self.freeze()

    def freeze(self) -> None:
        for m in [self.vae, *self.encoders.values()]:
            m.eval().requires_grad_(False)

    def load(self, stage: Stage, folder: Path) -> None:
        """The weights a finished stage left, in place of the fresh (or earlier) ones."""
        if stage.kind == "controlnet":  # the model stays as it was
            self.controlnet = folder / OUTPUT[stage.kind]
            return
        weights = load_file(str(folder / OUTPUT[stage.kind]))
        if stage.kind == "text":
            for name, m in self.encoders.items():
                m.load_state_dict({k.removeprefix(f"{name}."): v for k, v in weights.items()
                                   if k.startswith(f"{name}.")})  # fmt: skip
        else:
            (self.mmdit if stage.kind == "mmdit" else self.vae).load_state_dict(weights)
        self.freeze()


OUTPUT = {
    "text": "text_encoders.safetensors",
    "vae": "vae.safetensors",
    "decoder": "vae.safetensors",
    "mmdit": "mmdit.safetensors",
    "controlnet": "controlnet.safetensors",
}


class Progress:
    """One bar for the whole run, in budgeted minutes: each stage moves it across its share."""

    def __init__(self, stages: tuple[Stage, ...]):
        self.stages = stages
        self.budgets = [budget_minutes(s) for s in stages]
        self.offsets = np.cumsum([0.0] + [sum(b) for b in self.budgets]).tolist()
        self.bar = tqdm(
            total=self.offsets[-1], unit="min", dynamic_ncols=True,
            bar_format="{desc} {percentage:3.0f}%|{bar}| {n:.1f}/{total:.1f} budgeted min "
            "[{elapsed}<{remaining}{postfix}]",
        )  # fmt: skip
        self.index = 0

    def begin(self, index: int, stage: Stage) -> None:
        self.index = index
        self.bar.set_description(f"stage {index + 1}/{len(self.stages)} {stage.name}")

    def at(self, part: str, fraction: float) -> None:
        """Move to `fraction` of this stage's "prepare" or "train" part."""
        prepare, train = self.budgets[self.index]
        done = prepare * fraction if part == "prepare" else prepare + train * fraction
        self._to(self.offsets[self.index] + done)

    def training(self, steps: int):
        """An `on_step(step, loss)` callback that moves the bar through the training part."""

        def on_step(step: int, loss: float) -> None:
            self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            self.at("train", step / steps)

        return on_step

    def end(self, index: int) -> None:
        self._to(self.offsets[index + 1])

    def _to(self, n: float) -> None:
        self.bar.update(min(n, self.offsets[-1]) - self.bar.n)

    def close(self) -> None:
        self.bar.close()


def train_text(stage: Stage, seed: int, folder: Path, run: Run, progress: Progress) -> dict:
    """Pre-train the text encoders on the captions' structure, then freeze them."""
    heldout = [p.text for p in heldout_prompts()]
    if stage.heldout:  # evenly spaced, so every category is read
        heldout = heldout[:: max(1, len(heldout) // stage.heldout)]
    started = time.perf_counter()
    report = pretrain_text_encoders(
        run.text, stage.steps, heldout, batch_size=stage.batch, lr=stage.lr,
        mix=parse_mix(stage.mix), pool=stage.scenes, seed=seed, progress=False,
        on_step=progress.training(stage.steps),
    )  # fmt: skip
    seconds = time.perf_counter() - started
    weights = {f"{n}.{k}": v.contiguous() for n, m in run.encoders.items()
               for k, v in m.state_dict().items()}  # fmt: skip
    save_atomic(folder / OUTPUT["text"], weights)
    run.freeze()
    return {"loss": round(report.loss_last, 5), "images_per_s": None,  # captions, no images
            "captions_per_s": round(stage.steps * stage.batch / seconds, 1),
            "text_pretraining": asdict(report)}  # fmt: skip


def train_vae(stage: Stage, seed: int, folder: Path, run: Run, progress: Progress) -> dict:
    """Train the VAE on scenes, then fit its latents to the MMDiT's latent format."""
    data = ShapesDataset(stage.size, stage.scenes, seed)
    started = time.perf_counter()
    losses = train_autoencoder(
        run.vae, data, stage.steps, batch_size=stage.batch, lr=stage.lr, seed=seed, bf16=run.bf16,
        progress=False, on_step=progress.training(stage.steps),
    )  # fmt: skip
    seconds = time.perf_counter() - started
    fit_latent_format(run.vae, torch.stack([data[i][0] for i in range(min(512, len(data)))]))
    save_atomic(
        folder / OUTPUT["vae"], {k: v.contiguous() for k, v in run.vae.state_dict().items()}
    )
    run.freeze()
    return {
        "loss": last_tenth(losses),
        "images_per_s": round(stage.steps * stage.batch / seconds, 1),
    }


def train_decoder(stage: Stage, seed: int, folder: Path, run: Run, progress: Progress) -> dict:
    """Train the VAE's decoder alone on new scenes at the stage's size; the reconstruction of
    held-out scenes at 64x64 and 128x128 before and after goes in the record."""
    sizes = (SIZE, HIRES)
    before = {s: asdict(measure_reconstruction(run.vae, s, stage.heldout)) for s in sizes}
    data = ShapesDataset(stage.size, stage.scenes, seed)
    started = time.perf_counter()
    losses = train_autoencoder(
        run.vae, data, stage.steps, batch_size=stage.batch, lr=stage.lr, seed=seed, bf16=run.bf16,
        progress=False, on_step=progress.training(stage.steps), train_encoder=False,
    )  # fmt: skip
    seconds = time.perf_counter() - started
    save_atomic(
        folder / OUTPUT["vae"], {k: v.contiguous() for k, v in run.vae.state_dict().items()}
    )
    run.freeze()
    after = {s: asdict(measure_reconstruction(run.vae, s, stage.heldout)) for s in sizes}
    return {
        "loss": last_tenth(losses),
        "images_per_s": round(stage.steps * stage.batch / seconds, 1),
        "reconstruction_before": before,
        "reconstruction_after": after,
    }


def train_mmdit(stage: Stage, seed: int, folder: Path, run: Run, progress: Progress) -> dict | None:
    """Encode the stage's new scenes, then train (or continue) the MMDiT on them; the networks
    then hold its EMA weights, where the next stage starts. None if stopped early (Ctrl-C)."""
    data = ShapesDataset(stage.size, stage.scenes, seed, parse_mix(stage.mix))
    encoded = [0]

    def on_encoded(n: int) -> None:
        encoded[0] += n
        progress.at("prepare", encoded[0] / stage.scenes)

    key = {
        "seed": str(seed),
        "size": str(stage.size),
        "scenes": str(stage.scenes),
        "mix": stage.mix,
    }
    latents, captions = cached_latents(
        folder / "latents.safetensors", data, run.vae, key, batch_size=32, on_encoded=on_encoded
    )
    config = TrainConfig(
        steps=stage.steps, batch_size=stage.batch, lr=stage.lr, lr_schedule="cosine",
        warmup_steps=stage.warmup, timestep_sampling="logit_normal", logit_mean=stage.logit_mean,
        ema_decay=0.999, grad_clip=1.0, text_dropout=0.1, bf16=run.bf16, compile=run.compile,
        checkpoint_every=250, seed=seed,
    )  # fmt: skip
    trainer = Trainer(config, run.mmdit, run.text, latents, captions, folder,
                      metadata={"stage": stage.name}, progress=False)  # fmt: skip
    step, earlier = resumed_training(trainer, folder, progress.training(stage.steps))
    if step < stage.steps:
        return None
    with trainer.ema_weights():
        weights = {k: v.detach().clone().contiguous() for k, v in run.mmdit.state_dict().items()}
    run.mmdit.load_state_dict(weights)
    save_atomic(folder / OUTPUT["mmdit"], weights)
    return {**logged(folder), "earlier_seconds": earlier}


def train_controlnet(
    stage: Stage, seed: int, folder: Path, run: Run, progress: Progress
) -> dict | None:
    """Encode the stage's new scenes and their edges, then train (or continue) a canny ControlNet
    for the model, which stays frozen; its EMA weights go to the stage's file in Stability's
    layout (fp16, the model's preset). None if stopped early (Ctrl-C)."""
    data = ShapesDataset(stage.size, stage.scenes, seed)
    encoded = [0]

    def on_encoded(n: int) -> None:
        encoded[0] += n
        progress.at("prepare", encoded[0] / (2 * stage.scenes))

    key = {"seed": str(seed), "size": str(stage.size), "scenes": str(stage.scenes)}
    latents, captions = cached_latents(
        folder / "latents.safetensors", data, run.vae, key, batch_size=32, on_encoded=on_encoded
    )
    controls, _ = cached_latents(
        folder / "controls.safetensors", shapes_edges(data), run.vae, key | {"control": "canny"},
        batch_size=32, encode=control_encoder(run.vae), on_encoded=on_encoded,
    )  # fmt: skip
    config = TrainConfig(
        steps=stage.steps, batch_size=stage.batch, lr=stage.lr, warmup_steps=stage.warmup,
        timestep_sampling="logit_normal", logit_mean=stage.logit_mean, ema_decay=0.99,
        bf16=run.bf16, compile=run.compile, checkpoint_every=50, seed=seed,
        controlnet_blocks=CONTROLNET_BLOCKS,
    )  # fmt: skip
    trainer = Trainer(config, run.mmdit, run.text, latents, captions, folder,
                      metadata={"stage": stage.name}, progress=False, controls=controls)  # fmt: skip
    step, earlier = resumed_training(trainer, folder, progress.training(stage.steps))
    if step < stage.steps:
        return None
    meta = {PRESET_METADATA: json.dumps({**PRESET, "size": stage.size})}
    with trainer.ema_weights():
        save_controlnet(folder / OUTPUT["controlnet"], trainer.controlnet, "canny",
                        torch.float16, meta)  # fmt: skip
    run.mmdit.requires_grad_(False)
    run.controlnet = folder / OUTPUT["controlnet"]
    return {**logged(folder), "earlier_seconds": earlier}


def resumed_training(trainer: Trainer, folder: Path, show) -> tuple[int, float]:
    """Train from the trainer's last checkpoint, if any, to its last step or a Ctrl-C: (the step
    reached, the seconds of earlier tries). The time so far is kept in `folder/partial.json`,
    written with every checkpoint, so a run killed outright keeps it too."""
    if trainer.checkpoint_path.is_file():
        trainer.resume()
    partial = folder / "partial.json"
    earlier = json.loads(partial.read_text())["seconds"] if partial.is_file() else 0.0
    started = time.perf_counter()
    every = trainer.config.checkpoint_every

    def on_step(step: int, loss: float) -> None:
        show(step, loss)
        if step > 1 and (step - 1) % every == 0:  # the last save is whole: its time holds if
            # the run is killed before the next (one step's more, redone)
            write_json(partial, {"seconds": earlier + time.perf_counter() - started})

    step = trainer.train(on_step=on_step)
    if step < trainer.config.steps:
        write_json(partial, {"seconds": earlier + time.perf_counter() - started})
    return step, earlier


def logged(folder: Path) -> dict:
    """The final loss and the median images/s of a trainer's log in `folder`."""
    log = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]
    return {"loss": last_tenth([e["loss"] for e in log]),
            "images_per_s": round(float(np.median([e["images_per_s"] for e in log])), 1)}  # fmt: skip


TRAIN = {
    "text": train_text,
    "vae": train_vae,
    "decoder": train_decoder,
    "mmdit": train_mmdit,
    "controlnet": train_controlnet,
}


def last_tenth(losses: list[float]) -> float:
    """The final loss: the mean of the last 10% of steps."""
    tail = losses[-max(1, len(losses) // 10) :]
    return round(sum(tail) / len(tail), 5)


def machine() -> dict:
    """What ran a stage: the CPU's model name, what it computes natively, torch and its threads."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
        name = next(
            line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")
        )
    except (OSError, StopIteration):
        name = platform.processor() or platform.machine()
    return {"cpu": name, "bf16": cpu_has_bf16(), "amx": cpu_has_amx(), "avx2": "avx2" in cpu_flags(),
            "torch": torch.__version__, "threads": torch.get_num_threads()}  # fmt: skip


def write_record(out: Path, stages: tuple[Stage, ...]) -> None:
    """`out/record.json`: the command and one record per finished stage, in recipe order."""
    done = [out / s.name / DONE for s in stages]
    record = {
        "command": sys.argv,
        "stages": [json.loads(p.read_text()) for p in done if p.is_file()],
    }
    write_json(out / "record.json", record)


def write_json(path: Path, value: dict) -> None:
    """Replace `path` in one step: a kill leaves the old file or the new one, never half."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(value, indent=1, allow_nan=False))
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
