"""The `sd3` command line: generate, inspect, train, eval, lora, serve."""

import argparse
import io
import math
import os
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import save
from tqdm import tqdm

from . import batch, distributed, metadata
from .checkpoints import COMPONENTS, DTYPE_NAMES, find_components, infer_config
from .control import TYPES, Control
from .inpainting import OUTPAINT_FILLS, Inpaint, outpaint_size
from .loras import LoRAFile
from .loras.convert import TARGETS, convert
from .loras.names import COMPONENT_NAMES, describe_format, origin, scheme_of
from .models.vae import from_latent_format
from .outputs import check_folder, check_new_file, next_free, write_new
from .pipeline import Pipeline, Settings, check_settings, describe_timings, load_image
from .preprocess import PREPROCESSORS, Preprocess, check_depth_model, preprocess
from .presets import detect_model
from .sampling import SAMPLERS, SkipLayerGuidance
from .shapes import evaluation

DEFAULT_MODEL = Path(__file__).parent / "assets" / "default" / "sd3_shapes.safetensors"
# bundled ControlNets for the bundled model, by the short name --controlnet takes
BUNDLED_CONTROLNETS = {
    "shapes-canny": DEFAULT_MODEL.with_name("sd3_shapes_controlnet_canny.safetensors"),
}
OPTION_OF = {"clip_l": "--clip-l", "clip_g": "--clip-g", "t5xxl": "--t5xxl", "vae": "--vae"}


# --- generate --------------------------------------------------------------------------------


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """The model files and how to sample them: shared by generate and eval."""
    p.add_argument(
        "--model",
        help="Stability single file (.safetensors or .gguf) or diffusers folder (default: the "
        "bundled shapes model)",
    )
    p.add_argument("--clip-l", help="CLIP-L file (if not bundled in --model)")
    p.add_argument("--clip-g", help="CLIP-G file (if not bundled in --model)")
    p.add_argument(
        "--t5xxl", help="T5-XXL file (optional: without it T5's part of the context is zeros)"
    )
    p.add_argument("--vae", help="VAE file (if not bundled in --model)")
    p.add_argument(
        "--dtype", choices=sorted(DTYPE_NAMES), help="compute dtype (default: bf16 where native)"
    )
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument(
        "--int8", action="store_true", default=None,
        help="int8 T5-XXL and MMDiT blocks: half their memory (a third in fp32); the MMDiT "
        "multiplies in int8 where the CPU does that faster than in the compute dtype, else the "
        "weights are dequantized as each layer runs; a small output error (see the README)",
    )  # fmt: skip
    p.add_argument(
        "--int4", action="store_true", default=None,
        help="4-bit T5-XXL and MMDiT blocks (groups of 32 with an fp16 scale, as GGUF's Q4_0, "
        "whose weights load as stored): about 0.28 of their bf16 memory, dequantized as each "
        "layer runs; a larger output error than --int8 (see docs/gguf.md)",
    )  # fmt: skip
    p.add_argument(
        "--compile", action="store_true",
        help="run the MMDiT under torch.compile: the first step compiles, later steps run faster "
        "on a GPU; on CPUs it replaces sd3's own kernels and is slower",
    )  # fmt: skip
    p.add_argument(
        "--low-memory",
        action=argparse.BooleanOptionalAction,
        help="load the text encoders first and release them before the MMDiT loads, and release "
        "the MMDiT before decoding (default: on when the weights need over 60%% of the free memory)",
    )
    p.add_argument(
        "--lora", action="append", metavar="FILE[:SCALE]",
        help="a LoRA, merged into the weights as they load, at strength SCALE (default 1); "
        "repeat for several. Reads kohya, diffusers/PEFT, ComfyUI, OneTrainer and LyCORIS "
        "(LoHa, LoKr) files, text-encoder LoRAs and DoRA; a file of which nothing applies is "
        "an error",
    )  # fmt: skip
    p.add_argument("--negative", help="negative prompt (default: empty)")
    p.add_argument("--steps", type=int, help="denoising steps (default: the model's preset)")
    p.add_argument("--cfg", type=float, help="classifier-free guidance scale (1 turns it off)")
    p.add_argument(
        "--cfg-start", type=float,
        help="CFG starts at this fraction of the steps (default: the preset's, usually 0)",
    )  # fmt: skip
    p.add_argument(
        "--cfg-end", type=float,
        help="CFG ends at this fraction of the steps; later steps run the conditional pass alone, "
        "at half the cost (default: the preset's, usually 1)",
    )  # fmt: skip
    p.add_argument(
        "--sampler", choices=sorted(SAMPLERS), help="sampler (default: the model's preset)"
    )
    p.add_argument("--shift", type=float, help="flow schedule shift (default: the model's preset)")
    p.add_argument("--width", type=int, help="multiple of 16 (default: the model's preset)")
    p.add_argument("--height", type=int, help="multiple of 16 (default: the model's preset)")
    p.add_argument(
        "--no-t5", action="store_true", default=None, help="leave T5 out (zeros in its place)"
    )
    p.add_argument(
        "--t5-length", type=int, help="fixed T5 token length (default: 77..256 by prompt)"
    )
    p.add_argument("--slg-scale", type=float, help="skip-layer guidance scale (0 turns it off)")
    p.add_argument("--slg-layers", help="comma-separated joint blocks to skip, e.g. 7,8,9")
    p.add_argument(
        "--slg-start", type=float, help="skip-layer guidance starts after this fraction of steps"
    )
    p.add_argument(
        "--slg-end", type=float, help="skip-layer guidance ends at this fraction of steps"
    )


def add_generate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", nargs="?", help="what to draw")
    add_model_arguments(p)
    p.add_argument("--seed", type=int, help="seed; image i of a batch uses seed + i (default: 0)")
    p.add_argument("--batch", type=int, help="number of images (default: 1)")
    p.add_argument("--init-image", help="image file for img2img")
    p.add_argument(
        "--denoise", type=float,
        help="img2img strength in (0, 1] (default 0.6 with --init-image, 1 with --mask/--outpaint)",
    )  # fmt: skip
    p.add_argument(
        "--mask", help="inpaint the init image where this image is white (grey: partly, later)"
    )
    p.add_argument("--mask-blur", type=float, help="feather the mask: Gaussian sigma in pixels")
    p.add_argument("--mask-grow", type=int, help="dilate the mask by this many pixels first")
    p.add_argument(
        "--no-paste-back", action="store_true", default=None,
        help="keep the decoded image as it is (default: unmasked pixels are the input's)",
    )  # fmt: skip
    p.add_argument(
        "--inpaint-crop", type=int, metavar="PAD",
        help="inpaint a box around the mask, grown by PAD pixels, at the full working size",
    )  # fmt: skip
    p.add_argument(
        "--outpaint", metavar="L,T,R,B",
        help="extend the init image by these pixels left, top, right, bottom (the canvas grows "
        "right and down to multiples of 16) and paint the new area",
    )  # fmt: skip
    p.add_argument(
        "--outpaint-fill", choices=OUTPAINT_FILLS,
        help="what the new area starts from (default: edge-noise, the edge pixels plus noise)",
    )  # fmt: skip
    add_control_arguments(p)
    p.add_argument("--out", help="output PNG (default: sd3_SEED.png); never overwritten")
    p.add_argument(
        "--prompts", metavar="FILE",
        help="a prompt file instead of PROMPT: one prompt a line, or a .jsonl file of objects "
        "with prompt and optionally negative, seed or seeds, steps, cfg, cfg_start, cfg_end, "
        "sampler, shift, width, height, t5_length; one image per prompt and seed (--seed, "
        "--batch) into --out-dir as LINE_SEED.png, those present skipped; under torchrun the "
        "ranks share the work",
    )  # fmt: skip
    p.add_argument("--out-dir", help="the folder of --prompts' images (made if missing)")
    p.add_argument("--save-latent", help="also write the final latent (what the VAE decodes) here")
    p.add_argument("--from-png", help="re-run the settings stored in a PNG made by sd3")


def add_control_arguments(p: argparse.ArgumentParser) -> None:
    each = "; once for all ControlNets or once per --controlnet"
    p.add_argument(
        "--controlnet", action="append", metavar="FILE",
        help="a ControlNet file or diffusers folder (shapes-canny: the bundled model's canny "
        "ControlNet); repeat, each with its --control-image",
    )  # fmt: skip
    p.add_argument(
        "--control-image", action="append", metavar="IMG",
        help="the image for the --controlnet in the same position",
    )  # fmt: skip
    p.add_argument(
        "--control-type", action="append", choices=("auto", *TYPES),
        help="how the control image is scaled (default auto: the type the file records)" + each,
    )  # fmt: skip
    p.add_argument(
        "--control-strength", action="append", type=float,
        help="multiplier on the ControlNet's outputs (default 1)" + each,
    )  # fmt: skip
    p.add_argument(
        "--control-start", action="append", type=float,
        help="fraction of the steps before the ControlNet starts (default 0)" + each,
    )  # fmt: skip
    p.add_argument(
        "--control-end", action="append", type=float,
        help="fraction of the steps after which it stops (default 1)" + each,
    )  # fmt: skip
    p.add_argument(
        "--control-preprocess", action="append", choices=PREPROCESSORS,
        help="make the control image from the given one (default none: it is one)" + each,
    )  # fmt: skip
    p.add_argument("--canny-low", type=int, help="canny lower threshold (default 100)")
    p.add_argument("--canny-high", type=int, help="canny upper threshold (default 200)")
    p.add_argument("--blur-sigma", type=float, help="blur preprocessor sigma in pixels (default 5)")
    p.add_argument(
        "--depth-model", metavar="FOLDER",
        help="a transformers depth-estimation model folder, for --control-preprocess depth",
    )  # fmt: skip


def resolve_controls(
    args: argparse.Namespace, n: int, stored: tuple[Control, ...]
) -> tuple[Control, ...]:
    """One Control per ControlNet: the PNG's, then what was given (once for all or once each)."""
    if n == 0:
        return ()
    base = list(stored) if len(stored) == n else [Control() for _ in range(n)]

    def each(option: str) -> list:
        values = getattr(args, option.replace("-", "_"), None)
        if values is None:
            return [None] * n
        if len(values) == 1:
            return values * n
        if len(values) != n:
            raise ValueError(f"--{option} given {len(values)} times for {n} ControlNets")
        return values

    out = []
    for c, ctype, strength, start, end, prep in zip(
        base, each("control-type"), each("control-strength"), each("control-start"),
        each("control-end"), each("control-preprocess"), strict=True,
    ):  # fmt: skip
        pre = c.preprocess
        pre = Preprocess(
            pre.kind if prep is None else prep,
            pre.canny_low if args.canny_low is None else args.canny_low,
            pre.canny_high if args.canny_high is None else args.canny_high,
            pre.blur_sigma if args.blur_sigma is None else args.blur_sigma,
        )
        out.append(
            Control(
                c.strength if strength is None else strength,
                c.start if start is None else start,
                c.end if end is None else end,
                c.control_type if ctype is None else (None if ctype == "auto" else ctype),
                pre,
            )
        )
    return tuple(out)


def parse_layers(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ValueError(
            f"--slg-layers {text!r} must be comma-separated block numbers, e.g. 7,8,9"
        ) from None


def resolve_settings(args: argparse.Namespace, pipe: Pipeline, stored: Settings | None) -> Settings:
    """The preset, then the PNG's settings, then what was given on the command line."""
    prompt = getattr(args, "prompt", None)
    s = stored if stored is not None else pipe.settings(prompt or "")
    given = {
        "prompt": prompt,
        "negative_prompt": args.negative,
        "steps": args.steps,
        "cfg": args.cfg,
        "cfg_start": args.cfg_start,
        "cfg_end": args.cfg_end,
        "sampler": args.sampler,
        "shift": args.shift,
        "seed": getattr(args, "seed", None),
        "width": args.width,
        "height": args.height,
        "num_images": getattr(args, "batch", None),
        "denoise": getattr(args, "denoise", None),
        "t5_length": args.t5_length,
        "use_t5": False if args.no_t5 else None,
    }
    s = replace(s, **{k: v for k, v in given.items() if v is not None})
    inpaint = resolve_inpaint(args, s.inpaint)
    if inpaint is not None:
        s = replace(s, inpaint=inpaint)
    elif getattr(args, "init_image", None) and args.denoise is None and not stored:
        s = replace(s, denoise=0.6)
    slg_given = [args.slg_scale, args.slg_layers, args.slg_start, args.slg_end]
    if any(v is not None for v in slg_given):
        base = s.slg or SkipLayerGuidance()
        s = replace(
            s,
            slg=SkipLayerGuidance(
                scale=base.scale if args.slg_scale is None else args.slg_scale,
                layers=base.layers if args.slg_layers is None else parse_layers(args.slg_layers),
                start=base.start if args.slg_start is None else args.slg_start,
                end=base.end if args.slg_end is None else args.slg_end,
            ),
        )
    if s.slg is not None and s.slg.scale == 0:
        s = replace(s, slg=None)
    n = len(pipe.controlnets)
    return replace(s, controls=resolve_controls(args, n, s.controls if stored else ()))


OUTPUT_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}


def parse_pads(text: str) -> tuple[int, int, int, int]:
    try:
        pads = tuple(int(x) for x in text.split(","))
    except ValueError:
        pads = ()
    if len(pads) != 4:
        raise ValueError(f"--outpaint {text!r} must be four whole numbers: LEFT,TOP,RIGHT,BOTTOM")
    return pads


def resolve_inpaint(args: argparse.Namespace, stored: Inpaint | None) -> Inpaint | None:
    """The masked-generation settings: stored ones (from a PNG), then those given."""
    given = {
        "mask_blur": getattr(args, "mask_blur", None),
        "mask_grow": getattr(args, "mask_grow", None),
        "paste_back": False if getattr(args, "no_paste_back", None) else None,
        "crop": getattr(args, "inpaint_crop", None),
        "outpaint": parse_pads(args.outpaint) if getattr(args, "outpaint", None) else None,
        "outpaint_fill": getattr(args, "outpaint_fill", None),
    }
    masked = getattr(args, "mask", None) is not None or given["outpaint"] is not None
    if stored is None and not masked:
        used = [k for k, v in given.items() if v is not None]
        if used:
            names = ", ".join("--" + k.replace("_", "-") for k in used)
            raise ValueError(f"{names} apply to inpainting: give --mask (or --outpaint)")
        return None
    return replace(stored or Inpaint(), **{k: v for k, v in given.items() if v is not None})


def output_paths(out: str | None, seed: int, n: int) -> list[Path]:
    """Where the images go, checked before any work: a given --out must not exist, must name a
    format sd3 writes, and its folder must take new files; default names step around existing
    files. (The writes themselves never replace a file either: `outputs.write_new`.)"""
    if out is not None:
        base = Path(out)
        if base.suffix.lower() not in OUTPUT_FORMATS:
            raise ValueError(
                f"--out {out}: sd3 writes {', '.join(OUTPUT_FORMATS)} files, not {base.suffix!r}"
            )
        paths = (
            [base]
            if n == 1
            else [base.with_name(f"{base.stem}-{i}{base.suffix}") for i in range(n)]
        )
        for path in paths:
            check_new_file(path, "--out")
        return paths
    check_folder(Path.cwd(), "--out", Path.cwd() / f"sd3_{seed}.png")
    paths = []
    for i in range(n):
        paths.append(next_free(Path(f"sd3_{seed + i}.png"), set(paths)))
    return paths


def parse_device(text: str) -> torch.device:
    """A torch device this machine has, or one ValueError naming --device."""
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise ValueError(
            f"--device {text!r} is not a device name (cpu, cuda, cuda:1, mps)"
        ) from None
    if device.type == "cpu":
        return device
    backend = getattr(torch, device.type, None)
    available = getattr(backend, "is_available", lambda: False)
    if not available():
        raise ValueError(f"--device {text}: this machine has no {device.type} device")
    count = getattr(backend, "device_count", lambda: 1)()
    if device.index is not None and device.index >= count:
        raise ValueError(f"--device {text}: this machine has {count} {device.type} device(s)")
    return device


def parse_lora(text: str) -> tuple[str, float | None]:
    """--lora FILE[:SCALE] -> (FILE, SCALE or None); a colon that is part of the file name (a
    Windows drive) stays in it."""
    head, sep, tail = text.rpartition(":")
    if not (sep and head):
        return text, None
    try:
        scale = float(tail)
    except ValueError:
        if Path(head).exists() and not Path(text).exists():
            raise ValueError(f"--lora {text}: the scale {tail!r} is not a number") from None
        return text, None
    if not math.isfinite(scale):
        raise ValueError(f"--lora {text}: the scale must be a finite number")
    return head, scale


def lora_files(args: argparse.Namespace, stored: dict | None) -> list[dict]:
    """[{"path", "scale"}]: the LoRAs a PNG records (each found by name and hash next to it or in
    the current folder, or given again with --lora: then its scale unless one is given), then the
    other --lora files; one error naming every recorded LoRA found nowhere."""
    given = [parse_lora(text) for text in getattr(args, "lora", None) or []]
    for path, _ in given:
        if not Path(path).is_file():
            raise ValueError(f"--lora {path}: no such file")
    loras, missing = [], []
    for record in stored["files"].get("loras", []) if stored else []:
        again = [i for i, (path, _) in enumerate(given) if Path(path).name == record["name"]]
        if again:
            path, scale = given.pop(again[0])
            digest = metadata.short_hash(path)
            if record["sha256"] and digest and digest != record["sha256"]:
                warnings.warn(
                    f"--lora {path}: sha256 {digest}... differs from the {record['sha256']}... "
                    f"the PNG recorded for {record['name']}",
                    stacklevel=2,
                )
            loras.append({"path": path, "scale": record["scale"] if scale is None else scale})
            continue
        found = metadata.find(record, Path(args.from_png))
        if found is None:
            missing.append(record)
        else:
            loras.append({"path": str(found), "scale": record["scale"]})
    if missing:
        names = ", ".join(metadata.describe_record(r) for r in missing)
        raise metadata.MetadataError(
            f"--from-png {args.from_png}: the LoRA file{'s' if len(missing) > 1 else ''} {names} "
            "recorded in it are not next to the PNG or in the current folder; give them again "
            "with --lora FILE"
        )
    loras += [{"path": path, "scale": 1.0 if s is None else s} for path, s in given]
    return loras


def model_files(args: argparse.Namespace, stored: dict | None = None) -> dict:
    """The files to load: those given, else those a PNG records (found by name and hash next
    to it or in the current folder), else the bundled model; plus dtype, int8, int4 and the
    LoRAs."""
    files = {}
    for key, value in (stored["files"] if stored else {}).items():
        if key == "loras" or getattr(args, key, None) is not None or value is None:
            continue
        if key in metadata.FILE_KEYS:
            files[key] = str(metadata.locate(key, value, Path(args.from_png), DEFAULT_MODEL))
        elif key in metadata.FILE_LIST_KEYS:
            png = Path(args.from_png)
            bundled = {path.name: path for path in BUNDLED_CONTROLNETS.values()}
            files[key] = [
                str(metadata.locate(key, v, png, bundled.get(v["name"], DEFAULT_MODEL)))
                for v in value
            ]
        else:
            files[key] = value
    for key in (*metadata.FILE_KEYS, *metadata.FILE_LIST_KEYS, "dtype", "int8", "int4"):
        if getattr(args, key, None) is not None:
            files[key] = getattr(args, key)
    if files.get("controlnet"):  # a short name is the bundled file, unless a file has that name
        files["controlnet"] = [
            str(BUNDLED_CONTROLNETS[v]) if v in BUNDLED_CONTROLNETS and not Path(v).exists() else v
            for v in files["controlnet"]
        ]
    if files.get("model") is None:
        if not DEFAULT_MODEL.is_file():
            raise ValueError(
                "give --model FILE_OR_FOLDER (a Stability .safetensors file or a diffusers folder)"
            )
        files["model"] = str(DEFAULT_MODEL)
    loras = lora_files(args, stored)
    if loras:
        files["loras"] = loras
    return files


def file_records(files: dict) -> dict:
    """What an image records of its inputs: names and short hashes, dtype, int8, the LoRAs with
    their strengths and the ControlNets."""
    records = {}
    for key, value in files.items():
        if key == "loras":
            value = [metadata.lora_record(lo["path"], lo["scale"]) for lo in value]
        elif key in metadata.FILE_KEYS:
            value = metadata.file_record(value)
        elif key in metadata.FILE_LIST_KEYS:
            value = [metadata.file_record(v) for v in value]
        records[key] = value
    return records


def open_pipeline(
    files: dict, device: torch.device, low_memory: bool | None = None, compile: bool = False
) -> Pipeline:
    """The pipeline over the files, every key and shape checked, every LoRA matched against
    the model, no weights read yet."""
    pipe = Pipeline.from_single_file(
        files["model"],
        clip_l=files.get("clip_l"),
        clip_g=files.get("clip_g"),
        t5xxl=files.get("t5xxl"),
        vae=files.get("vae"),
        dtype=DTYPE_NAMES[files["dtype"]] if files.get("dtype") else None,
        device=device,
        low_memory=low_memory,
        int8=bool(files.get("int8")),
        int4=bool(files.get("int4")),
        compile=compile,
        load=False,
        loras=[(lo["path"], lo["scale"]) for lo in files.get("loras", [])],
        controlnets=files.get("controlnet") or (),
    )
    files["dtype"] = {v: k for k, v in DTYPE_NAMES.items()}[pipe.dtype]
    return pipe


def load_weights(pipe: Pipeline, files: dict) -> None:
    started = time.perf_counter()
    pipe.load()
    bundled = Path(files["model"]).resolve() == DEFAULT_MODEL.resolve()
    print(
        f"{pipe.preset.name}{' (bundled)' if bundled else ''}, {files['dtype']}{' (int8 weights)' if pipe.int8 else ' (int4 weights)' if pipe.int4 else ''} on {pipe.device}"
        f"{', low-memory mode' if pipe.low_memory else ''}{', MMDiT compiled on its first step' if pipe.compile else ''}, loaded in {time.perf_counter() - started:.1f}s",
        file=sys.stderr,
    )


def encoded_image(image: Image.Image, path: Path, s: Settings, records: dict) -> bytes:
    """The image file's bytes: PNG with both metadata chunks; JPEG and WebP with A1111's
    parameters in EXIF UserComment, as A1111 writes them (`--from-png` needs the PNG)."""
    buffer = io.BytesIO()
    kind = OUTPUT_FORMATS[path.suffix.lower()]
    if kind == "PNG":
        image.save(buffer, format="PNG", pnginfo=metadata.png_info(s, records))
    else:
        exif = Image.Exif()
        text = metadata.a1111_parameters(s, records["model"], records.get("loras", []))
        exif[0x9286] = b"UNICODE\0" + text.encode("utf-16-be")  # UserComment
        image.save(buffer, format=kind, exif=exif, quality=95)
    return buffer.getvalue()


def run_generate(args: argparse.Namespace) -> int:
    if args.prompts is not None or args.out_dir is not None:
        return run_prompt_file(args)
    # Everything that can be checked is checked before the weights load.
    stored = metadata.read_png(args.from_png) if args.from_png else None
    if args.prompt is None and not stored:  # "" is a prompt: unconditional, as in diffusers
        raise ValueError("give a prompt (or --from-png FILE)")
    device = parse_device(args.device)
    files = model_files(args, stored)
    init_image = (
        load_image(files["init_image"], "--init-image") if files.get("init_image") else None
    )
    mask_image = load_image(files["mask"], "--mask") if files.get("mask") else None
    nets, images = files.get("controlnet") or [], files.get("control_image") or []
    if len(nets) != len(images):
        raise ValueError(
            f"--controlnet and --control-image come in pairs: got {len(nets)} ControlNets and "
            f"{len(images)} control images"
        )
    control_images = [load_image(path, "--control-image") for path in images]
    if args.save_latent:
        check_new_file(args.save_latent, "--save-latent")
    pipe = open_pipeline(files, device, args.low_memory, args.compile)
    s = resolve_settings(args, pipe, stored["settings"] if stored else None)
    if s.inpaint is not None and s.inpaint.outpaint is not None and init_image is not None:
        s.inpaint.check(mask_image is not None)  # before the canvas is sized from it
        width, height = outpaint_size(init_image.size, s.inpaint.outpaint)
        if (args.width, args.height) != (None, None) and (args.width, args.height) != (
            width,
            height,
        ):
            raise ValueError(
                f"--outpaint makes a {width}x{height} canvas from the init image: leave out "
                "--width and --height"
            )
        if width * height != (init_image.width + sum(s.inpaint.outpaint[::2])) * (
            init_image.height + sum(s.inpaint.outpaint[1::2])
        ):
            print(
                f"sd3 generate: the canvas grows to {width}x{height} (multiples of 16)",
                file=sys.stderr,
            )
        s = replace(s, width=width, height=height)
    check_settings(s, pipe.config, init_image is not None, mask_image is not None)
    pipe.check_loras(s.use_t5)
    pipe.check_controls(s, len(control_images))
    if any(c.preprocess.kind == "depth" for c in s.controls):
        check_depth_model(args.depth_model)
    paths = output_paths(args.out, s.seed, s.num_images)
    records = file_records(files)

    control_images = [
        preprocess(image, c.preprocess, args.depth_model)
        for image, c in zip(control_images, s.controls, strict=True)
    ]
    load_weights(pipe, files)
    pipe.progress = True
    latents, images = pipe.generate(
        s, init_image, mask_image=mask_image, control_images=control_images
    )
    print(describe_timings(pipe.timings), file=sys.stderr)
    for lora in pipe.loras:
        print(lora.summary(), file=sys.stderr)
    if args.save_latent:
        data = save({"latent": from_latent_format(latents).contiguous()})
        write_new(args.save_latent, data, "--save-latent", move_if_taken=False)
    for i, (image, path) in enumerate(zip(images, paths, strict=True)):
        one = replace(s, seed=s.seed + i, num_images=1)
        written = write_new(path, encoded_image(image, path, one, records), "--out")
        if written != path:
            print(f"sd3 generate: {path} was taken meanwhile; wrote {written}", file=sys.stderr)
        print(written)
    return 0


SINGLE_IMAGE_OPTIONS = (
    "prompt", "out", "from_png", "init_image", "mask", "outpaint", "controlnet", "save_latent",
)  # fmt: skip


def run_prompt_file(args: argparse.Namespace) -> int:
    """`sd3 generate --prompts FILE --out-dir DIR`: every prompt and seed not yet in DIR, shared
    among the torchrun ranks; one progress bar (rank 0's) over the whole set."""
    if args.prompts is None or args.out_dir is None:
        raise ValueError("--prompts FILE and --out-dir DIR go together")
    for name in SINGLE_IMAGE_OPTIONS:
        if getattr(args, name, None) is not None:
            what = "PROMPT" if name == "prompt" else "--" + name.replace("_", "-")
            raise ValueError(f"{what} does not apply to --prompts (one text-to-image per line)")
    lines = batch.read_prompts(args.prompts)
    out_dir = Path(args.out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out-dir {out_dir} is a file, not a folder")
    files = model_files(args)
    device = distributed.local_device(parse_device(args.device))
    pipe = open_pipeline(files, device, args.low_memory, args.compile)
    base = resolve_settings(args, pipe, None)
    first = args.seed or 0
    seeds = tuple(range(first, first + (args.batch or 1)))
    jobs = batch.jobs(lines, base, seeds, pipe.config, Path(args.prompts))
    pipe.check_loras(base.use_t5)
    records = file_records(files)

    rank, world, device = distributed.join(device)
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        check_folder(out_dir, "--out-dir")
    todo = distributed.agree([j for j in jobs if not (out_dir / j.name).exists()])
    if rank == 0:
        print(
            f"sd3 generate: {len(jobs)} images, {len(jobs) - len(todo)} in {out_dir} already, "
            f"{len(todo)} to make" + (f" on {world} processes" if world > 1 else ""),
            file=sys.stderr,
        )
    mine = distributed.share(todo, rank, world)
    if todo:
        load_weights(pipe, files) if rank == 0 else pipe.load()
    with tqdm(
        total=len(jobs), initial=len(jobs) - len(todo), unit="image", disable=rank != 0
    ) as bar:
        for i in range(math.ceil(len(todo) / world)):  # every rank joins every round's count
            if i < len(mine):
                job = mine[i]
                _, (image,) = pipe.generate(job.settings)
                path = out_dir / job.name
                write_new(path, encoded_image(image, path, job.settings, records), "--out-dir",
                          move_if_taken=False)  # fmt: skip
                print(path)
            bar.update(distributed.total(int(i < len(mine)), device))
    distributed.leave()
    return 0


# --- inspect ---------------------------------------------------------------------------------


def describe_mmdit(component) -> str:
    c = infer_config(component)
    kind = detect_model(c, component.where())
    extras = [f"depth {c.depth}", f"width {c.hidden_size}", f"pos table {c.pos_embed_max_size}"]
    if c.qk_norm:
        extras.append("RMS qk-norm")
    if c.attn2_layers:
        extras.append(f"attn2 in blocks {c.attn2_layers[0]}-{c.attn2_layers[-1]}")
    return f"{kind} ({', '.join(extras)})"


def run_inspect(args: argparse.Namespace) -> int:
    found_all = {}
    for path in args.paths:
        found = find_components(path)
        found_all.update(found)
        print(path)
        if "mmdit" in found:
            print(f"  model: {describe_mmdit(found['mmdit'])}")
        for name, comp in found.items():
            infer_config(comp)  # raises a clear error if the tensors do not fit together
            dtypes = "/".join(comp.stored_dtypes)
            print(
                f"  {name:<7} {comp.num_params / 1e6:10.1f} M params  {dtypes:<14} {len(comp.tensors)} tensors"
            )
    missing = [name for name in COMPONENTS if name not in found_all]
    for name in missing:
        need = "optional" if name == "t5xxl" else "required"
        print(f"  {name:<7} missing ({need}: give it with {OPTION_OF.get(name, '--model')})")
    return 0


# --- lora ------------------------------------------------------------------------------------


def run_lora_convert(args: argparse.Namespace) -> int:
    out = Path(args.output)
    if out.suffix != ".safetensors":
        raise ValueError(f"OUT {out}: sd3 writes LoRAs as .safetensors files")
    check_new_file(out, "OUT")
    file = LoRAFile.open(args.input)
    dtype = DTYPE_NAMES[args.dtype] if args.dtype else None
    tensors, header = convert(file, args.to, dtype)
    written = write_new(out, save(tensors, header), "OUT", move_if_taken=False)
    print(f"{written}: {describe_format(file)} -> {args.to} ({len(tensors)} tensors)")
    return 0


def run_lora_inspect(args: argparse.Namespace) -> int:
    for path in args.paths:
        file = LoRAFile.open(path)
        counts = Counter(
            COMPONENT_NAMES[s.component] if (s := scheme_of(k)) else "unrecognised"
            for k in file.modules
        )
        order = [*COMPONENT_NAMES.values(), "unrecognised"]
        parts = ", ".join(f"{c} {counts[c]}" for c in order if counts[c])
        print(path)
        print(f"  format: {describe_format(file)}, {len(file.modules)} modules ({parts})")
        ranks = sorted({m.rank for m in file.modules.values() if m.rank})
        scales = sorted({round(m.scale, 6) for m in file.modules.values() if m.kind})
        if ranks:
            rank = f"{ranks[0]}" + (f"-{ranks[-1]}" if len(ranks) > 1 else "")
            scale = f"{scales[0]:g}" + (f"-{scales[-1]:g}" if len(scales) > 1 else "")
            print(f"  rank {rank}, scale (alpha / rank) {scale}")
        for key, m in [(k, m) for k, m in file.modules.items() if m.problem][:5]:
            print(f"  cannot apply {key}: {m.problem}")
        if file.other:
            print(f"  {len(file.other)} tensors that are no LoRA weights, e.g. {file.other[:3]}")
        print(f"  made for {origin(file)}")
    return 0


def add_lora_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="lora_command", required=True)
    conv = sub.add_parser(
        "convert", help="write a LoRA in diffusers', kohya's or ComfyUI's naming",
        description="Convert a LoRA from any format sd3 reads to diffusers (PEFT naming, which "
        "diffusers' load_lora_weights applies), kohya (sd-scripts' lora_unet_ names) or comfy "
        "(ComfyUI's diffusion_model. names). Never overwrites OUT.",
    )  # fmt: skip
    conv.add_argument("input", metavar="IN", help="the LoRA file (.safetensors)")
    conv.add_argument("output", metavar="OUT", help="the new file (.safetensors)")
    conv.add_argument("--to", required=True, choices=sorted(TARGETS), help="the naming to write")
    conv.add_argument(
        "--dtype", choices=sorted(DTYPE_NAMES), help="tensor dtype (default: the input's)"
    )
    conv.set_defaults(run=run_lora_convert)
    ins = sub.add_parser("inspect", help="what a LoRA file holds and what model it was made for")
    ins.add_argument("paths", nargs="+", help="LoRA files (.safetensors)")
    ins.set_defaults(run=run_lora_inspect)


# --- eval ------------------------------------------------------------------------------------


def run_eval(args: argparse.Namespace) -> int:
    """The held-out prompt-adherence benchmark of a model (or of the renderer, with --oracle)."""
    evaluation.check_arguments(args)
    if args.oracle is not None:
        return evaluation.run(args)
    files = model_files(args)
    device = distributed.local_device(parse_device(args.device))
    pipe = open_pipeline(files, device, args.low_memory, args.compile)
    base = resolve_settings(args, pipe, None)
    check_settings(base, pipe.config, has_init_image=False)
    rank, _, _ = distributed.join(device)  # under torchrun the ranks share the batches
    load_weights(pipe, files) if rank == 0 else pipe.load()

    def generate(prompts: list[str], seeds: list[int]) -> list[Image.Image]:
        # all prompts as one batch, each image from its own seed: the image it would be alone
        text = pipe.text_encoders(base.use_t5, base.t5_length)
        with torch.no_grad():
            context, pooled = text.encode([*prompts, base.negative_prompt])
        s = replace(base, num_images=len(prompts))
        conditioning = (context[:-1], pooled[:-1], context[-1:], pooled[-1:])
        return pipe.decode(pipe.sample(s, conditioning=conditioning, seeds=seeds))

    status = evaluation.run(args, generate)
    distributed.leave()
    return status


# --- entry point -----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sd3", description="Stable Diffusion 3 / 3.5 in PyTorch")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="text-to-image and image-to-image")
    add_generate_arguments(gen)
    gen.set_defaults(run=run_generate)
    ins = sub.add_parser("inspect", help="what a checkpoint file or folder holds")
    ins.add_argument("paths", nargs="+", help="safetensors files or diffusers folders")
    ins.set_defaults(run=run_inspect)
    ev = sub.add_parser(
        "eval", help="GenEval-style prompt-adherence benchmark on held-out shape prompts"
    )
    add_model_arguments(ev)
    evaluation.add_arguments(ev)
    ev.set_defaults(run=run_eval)
    lo = sub.add_parser("lora", help="convert or inspect LoRA files")
    add_lora_arguments(lo)
    from .serve import command as serve_command
    from .training import command as train_command  # the trainer's imports only when needed

    srv = sub.add_parser(
        "serve", help="HTTP server: the AUTOMATIC1111 API, sd3's job API and a web page"
    )
    serve_command.add_arguments(srv)
    srv.set_defaults(run=serve_command.run)

    tr = sub.add_parser(
        "train",
        help="rectified-flow training (full, LoRA, torchrun DDP or --shard); train export RUN OUT",
    )
    train_command.add_arguments(tr)
    tr.set_defaults(run=train_command.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:2] == ["train", "export"]:  # a command of its own beside train's options
        from .training.command import export_main

        return export_main(argv[2:])
    args = build_parser().parse_args(argv)
    return guarded(args.command, lambda: args.run(args))


def guarded(command: str, work: Callable[[], int]) -> int:
    """Run `work` as `sd3 COMMAND`: its exit status, or one line per error and the status that
    says what kind it was (2: a setting or file the user can fix; 1: the system or sd3 itself;
    130: Ctrl-C); warnings as one line each."""
    try:
        with warnings.catch_warnings():  # one line each, not the source line that raised it
            warnings.showwarning = lambda message, *_, **__: print(
                f"sd3 {command}: warning: {message}", file=sys.stderr
            )
            return work()
    except (ValueError, FileExistsError, FileNotFoundError) as e:  # CheckpointError is a ValueError
        print(f"sd3 {command}: error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"sd3 {command}: interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # the file system said no: name the file
        where = f"{e.filename}: " if e.filename else ""
        print(
            f"sd3 {command}: error: {where}{os.strerror(e.errno) if e.errno else e}",
            file=sys.stderr,
        )
        return 1
    except Exception as e:  # a bug or a case not foreseen: one line, the traceback on request
        if os.environ.get("SD3_DEBUG"):
            raise
        print(
            f"sd3 {command}: error: unexpected {type(e).__name__}: {one_line(e)} "
            "(run with SD3_DEBUG=1 for the traceback)",
            file=sys.stderr,
        )
        return 1


def one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


if __name__ == "__main__":
    sys.exit(main())
