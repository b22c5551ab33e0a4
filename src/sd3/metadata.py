"""What an image records about how it was made, and reading it back (`--from-png`).

A PNG carries two text chunks: `parameters`, the A1111 text that A1111, ComfyUI and Civitai read,
and `sd3`, JSON with every `Settings` field and the input files. Files are recorded by name and a
short sha256 (its first 10 hex digits, as A1111's model hashes), never by path, so an image
carries no folder names from the machine that made it. `--from-png` finds each file by name next
to the PNG, in the current folder or as the bundled model, checks its hash, and takes any file
given again on the command line instead.

LoRAs are recorded with their strength too ({"name", "sha256", "scale"} in the JSON's
`files.loras`), and in A1111's way in `parameters`: `<lora:NAME:SCALE>` after the prompt and a
`Lora hashes: "NAME: HASH, ..."` field (NAME the file name without its extension).
"""

import hashlib
import json
import math
import os
import re
from pathlib import Path
from typing import BinaryIO

from PIL import Image, PngImagePlugin

from .control import Control
from .inpainting import Inpaint
from .pipeline import Settings
from .preprocess import Preprocess
from .sampling import SkipLayerGuidance

FILE_KEYS = ("model", "clip_l", "clip_g", "t5xxl", "vae", "init_image", "mask")
OPTION_OF = {
    "model": "--model",
    "clip_l": "--clip-l",
    "clip_g": "--clip-g",
    "t5xxl": "--t5xxl",
    "vae": "--vae",
    "init_image": "--init-image",
    "mask": "--mask",
}
FILE_LIST_KEYS = ("controlnet", "control_image")  # one record per ControlNet, in order
OPTION_OF |= {"controlnet": "--controlnet", "control_image": "--control-image"}
HASH_DIGITS = 10
MAX_METADATA = 1 << 20  # bytes of JSON: far above what sd3 writes
MAX_LORAS = 64


class MetadataError(ValueError):
    pass


# --- file identity -----------------------------------------------------------------------------


def short_hash(path: str | Path) -> str | None:
    """The first 10 hex digits of the file's sha256 (None for a folder), cached by path, size and
    modification time in ~/.cache/sd3/hashes.json, since full-size checkpoints take seconds."""
    path = Path(path)
    if not path.is_file():
        return None
    stat = path.stat()
    key = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    cache_file = (
        Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sd3" / "hashes.json"
    )
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    if isinstance(cache, dict) and isinstance(cache.get(key), str):
        return cache[key]
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    value = digest.hexdigest()[:HASH_DIGITS]
    try:  # a cache, not a product: failing to write it changes nothing
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_name(f".hashes.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({**(cache if isinstance(cache, dict) else {}), key: value}))
        os.replace(tmp, cache_file)
    except OSError:
        pass
    return value


def file_record(path: str | Path) -> dict:
    """{"name": file name, "sha256": short hash or None}: what an image records of an input."""
    return {"name": Path(path).name, "sha256": short_hash(path)}


def lora_record(path: str | Path, scale: float) -> dict:
    """What an image records of a LoRA: file name, short hash and strength."""
    return {**file_record(path), "scale": scale}


def find(record: dict, png: Path, bundled: Path | None = None) -> Path | None:
    """The file a PNG's record names, next to the PNG, in the current folder, or the bundled
    model, whichever has its name and hash; None if none has."""
    name, digest = record["name"], record["sha256"]
    candidates = [png.parent / name, Path.cwd() / name]
    if bundled is not None and name == bundled.name:
        candidates.append(bundled)
    for candidate in candidates:
        if candidate.exists() and (digest is None or short_hash(candidate) == digest):
            return candidate
    return None


def describe_record(record: dict) -> str:
    return repr(record["name"]) + (f" (sha256 {record['sha256']}...)" if record["sha256"] else "")


def locate(key: str, record: dict, png: Path, bundled: Path) -> Path:
    """`find`, or one MetadataError saying what to pass."""
    found = find(record, png, bundled)
    if found is not None:
        return found
    raise MetadataError(
        f"--from-png {png}: the {key} file {describe_record(record)} is not next to the PNG or "
        f"in the current folder; give it again with {OPTION_OF[key]}"
    )


# --- writing -----------------------------------------------------------------------------------


def a1111_parameters(s: Settings, model: dict, loras: list[dict] = ()) -> str:
    """The `parameters` text that A1111, ComfyUI and Civitai read."""
    fields = [
        f"Steps: {s.steps}",
        f"Sampler: {s.sampler}",
        f"CFG scale: {s.cfg}",
        f"Seed: {s.seed}",
        f"Size: {s.width}x{s.height}",
    ]
    if model.get("sha256"):
        fields.append(f"Model hash: {model['sha256']}")
    fields += [f"Model: {Path(model['name']).stem}", f"Shift: {s.shift}"]
    if (s.cfg_start, s.cfg_end) != (0.0, 1.0):
        fields.append(f"CFG interval: {s.cfg_start}-{s.cfg_end}")
    if s.denoise < 1:
        fields.append(f"Denoising strength: {s.denoise}")
    if s.slg is not None:
        layers = ",".join(map(str, s.slg.layers))
        fields.append(f"SLG: scale {s.slg.scale}, layers {layers}, {s.slg.start}-{s.slg.end}")
    if not s.use_t5:
        fields.append("T5: off")
    prompt = s.prompt
    if loras:
        names = [Path(lo["name"]).stem for lo in loras]
        prompt += "".join(
            f" <lora:{n}:{lo['scale']:g}>" for n, lo in zip(names, loras, strict=True)
        )
        hashes = [
            f"{n}: {lo['sha256']}" for n, lo in zip(names, loras, strict=True) if lo["sha256"]
        ]
        if hashes:
            fields.append(f'Lora hashes: "{", ".join(hashes)}"')
    return f"{prompt}\nNegative prompt: {s.negative_prompt}\n" + ", ".join(fields)


def png_info(s: Settings, files: dict) -> PngImagePlugin.PngInfo:
    """Both text chunks for one image; `files` maps FILE_KEYS to records, plus dtype, int8, int4 and
    the LoRAs."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", a1111_parameters(s, files["model"], files.get("loras", [])))
    info.add_text("sd3", json.dumps({"settings": s.to_dict(), "files": files}))
    return info


# --- A1111's vocabulary ------------------------------------------------------------------------

# sd3's samplers under the names A1111 (and its API clients) use, with A1111's own aliases
A1111_SAMPLERS = {
    "euler": ("Euler", "k_euler"),
    "euler_ancestral": ("Euler a", "k_euler_a", "k_euler_ancestral"),
    "heun": ("Heun", "k_heun"),
    "dpmpp_2m": ("DPM++ 2M", "k_dpmpp_2m"),
    "dpmpp_2m_sde": ("DPM++ 2M SDE", "k_dpmpp_2m_sde"),
}
_SAMPLER_OF = {
    name.lower(): ours for ours, names in A1111_SAMPLERS.items() for name in (ours, *names)
}


def sampler_named(name: str) -> str | None:
    """sd3's sampler for an sd3 or A1111 sampler name or alias (any case), else None."""
    return _SAMPLER_OF.get(name.strip().lower())


# A1111's infotext: "KEY: VALUE" pairs, a value quoted where it holds a comma
_PARAMETER = re.compile(r'\s*([\w][\w \-/]*):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def parse_parameters(text: str) -> dict[str, str]:
    """A1111's `parameters` text -> {"prompt", "negative_prompt", and each "Key": value}, as
    A1111's own reader splits it: the last line holds the pairs when it has three or more."""
    *lines, last = text.strip().split("\n")
    if len(_PARAMETER.findall(last)) < 3:
        lines.append(last)
        last = ""
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:") :].strip()
        (negative if in_negative else prompt).append(line)
    found = {"prompt": "\n".join(prompt).strip(), "negative_prompt": "\n".join(negative).strip()}
    for key, value in _PARAMETER.findall(last):
        value = value.strip()
        if len(value) > 1 and value[0] == value[-1] == '"':
            try:
                value = json.loads(value)
            except ValueError:
                value = value[1:-1]
        found[key.strip()] = value
    return found


def settings_from_parameters(text: str) -> tuple[dict, list[str]]:
    """(Settings fields, keys left out) from A1111's `parameters` text: the prompts, steps,
    sampler, CFG scale, seed, size, denoising strength and shift, where sd3 has them."""
    found = parse_parameters(text)
    settings = {"prompt": found.pop("prompt"), "negative_prompt": found.pop("negative_prompt")}
    readers = {
        "Steps": ("steps", int),
        "CFG scale": ("cfg", float),
        "Seed": ("seed", int),
        "Denoising strength": ("denoise", float),
        "Shift": ("shift", float),
        "Sampler": ("sampler", lambda v: sampler_named(v) or _unknown()),
    }
    left_out = []
    for key, value in found.items():
        try:
            if key == "Size":
                width, height = (int(v) for v in value.lower().split("x"))
                settings.update(width=width, height=height)
            elif key in readers:
                name, read = readers[key]
                settings[name] = read(value)
            else:
                left_out.append(key)
        except ValueError:
            left_out.append(key)
    return settings, left_out


def _unknown():
    raise ValueError("not one of sd3's")


# --- reading -----------------------------------------------------------------------------------

NUMBER = (int, float)
SETTING_TYPES = {
    "prompt": (str,),
    "negative_prompt": (str,),
    "steps": (int,),
    "cfg": NUMBER,
    "cfg_start": NUMBER,
    "cfg_end": NUMBER,
    "sampler": (str,),
    "shift": NUMBER,
    "seed": (int,),
    "width": (int,),
    "height": (int,),
    "num_images": (int,),
    "denoise": NUMBER,
    "slg": (dict, type(None)),
    "t5_length": (int, type(None)),
    "use_t5": (bool,),
    "inpaint": (dict, type(None)),
    "controls": (list,),
}
# added after the first release: absent in older PNGs
OPTIONAL_SETTINGS = {"inpaint": None, "controls": []}
CONTROL_TYPES_ = {
    "strength": NUMBER,
    "start": NUMBER,
    "end": NUMBER,
    "control_type": (str, type(None)),
    "preprocess": (dict,),
}
PREPROCESS_TYPES = {
    "kind": (str,),
    "canny_low": (int,),
    "canny_high": (int,),
    "blur_sigma": NUMBER,
}
INPAINT_TYPES = {
    "mask_blur": NUMBER,
    "mask_grow": (int,),
    "paste_back": (bool,),
    "crop": (int, type(None)),
    "outpaint": (list, type(None)),
    "outpaint_fill": (str,),
}
SLG_TYPES = {"scale": NUMBER, "layers": (list,), "start": NUMBER, "end": NUMBER}


def read_png(path: str | Path | BinaryIO, where: str | None = None) -> dict:
    """{"settings": Settings, "files": {...}} from an sd3 PNG (a file, or an open binary file),
    every field checked: one MetadataError naming the field otherwise, beginning with `where`."""
    where = where or f"--from-png {path}"
    try:
        with Image.open(path) as image:
            if image.format != "PNG":
                raise MetadataError(f"{where}: not a PNG ({image.format} file)")
            text = getattr(image, "text", {}).get("sd3")
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        if isinstance(e, MetadataError):
            raise
        raise MetadataError(f"{where}: cannot read the image ({e})") from None
    if text is None:
        raise MetadataError(f"{where}: this PNG carries no sd3 settings")
    if len(text) > MAX_METADATA:
        raise MetadataError(f"{where}: its sd3 settings are implausibly large ({len(text)} bytes)")
    try:
        data = json.loads(text)
    except ValueError as e:
        raise MetadataError(f"{where}: its sd3 settings are not valid JSON ({e})") from None
    if not isinstance(data, dict) or set(data) != {"settings", "files"}:
        raise MetadataError(f'{where}: its sd3 settings must hold "settings" and "files" only')
    return {"settings": _settings(data["settings"], where), "files": _files(data["files"], where)}


def _check_fields(d, types: dict, what: str) -> None:
    if not isinstance(d, dict):
        raise MetadataError(f"{what} must be a JSON object, got {type(d).__name__}")
    unknown = sorted(set(d) - set(types))
    if unknown:
        raise MetadataError(f"{what} has unknown fields {unknown}")
    missing = sorted(set(types) - set(d))
    if missing:
        raise MetadataError(f"{what} lacks the fields {missing}")
    for name, allowed in types.items():
        value = d[name]
        if (isinstance(value, bool) and bool not in allowed) or not isinstance(value, allowed):
            names = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
            raise MetadataError(f"{what}: field {name!r} must be {names}, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise MetadataError(f"{what}: field {name!r} must be finite, got {value!r}")


def _settings(d, where: str) -> Settings:
    if isinstance(d, dict):
        d = {**OPTIONAL_SETTINGS, **d}
    _check_fields(d, SETTING_TYPES, f"{where}: settings")
    d = dict(d)
    if d["inpaint"] is not None:
        _check_fields(d["inpaint"], INPAINT_TYPES, f"{where}: settings.inpaint")
        pads = d["inpaint"]["outpaint"]
        if pads is not None and not (
            len(pads) == 4 and all(isinstance(p, int) and not isinstance(p, bool) for p in pads)
        ):
            raise MetadataError(f"{where}: settings.inpaint.outpaint must be 4 whole numbers")
        d["inpaint"] = Inpaint(**{**d["inpaint"], "outpaint": tuple(pads) if pads else None})
    if d["slg"] is not None:
        _check_fields(d["slg"], SLG_TYPES, f"{where}: settings.slg")
        layers = d["slg"]["layers"]
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
            raise MetadataError(f"{where}: settings.slg.layers must be whole numbers, got {layers}")
        d["slg"] = SkipLayerGuidance(**{**d["slg"], "layers": tuple(layers)})
    controls = []
    for i, c in enumerate(d["controls"]):
        what = f"{where}: settings.controls[{i}]"
        _check_fields(c, CONTROL_TYPES_, what)
        _check_fields(c["preprocess"], PREPROCESS_TYPES, f"{what}.preprocess")
        controls.append(Control(**{**c, "preprocess": Preprocess(**c["preprocess"])}))
    d["controls"] = tuple(controls)
    return Settings(**d)


def _files(d, where: str) -> dict:
    if not isinstance(d, dict):
        raise MetadataError(f"{where}: files must be a JSON object")
    unknown = sorted(set(d) - {*FILE_KEYS, *FILE_LIST_KEYS, "dtype", "int8", "int4", "loras"})
    if unknown:
        raise MetadataError(f"{where}: files has unknown fields {unknown}")
    if "model" not in d:
        raise MetadataError(f"{where}: files lacks the field 'model'")
    out = {}
    for key, value in d.items():
        if key == "dtype":
            if value is not None and value not in ("bf16", "fp16", "fp32"):
                raise MetadataError(f"{where}: files.dtype {value!r} is not bf16, fp16 or fp32")
        elif key in ("int8", "int4"):
            if not isinstance(value, bool | None):
                raise MetadataError(f"{where}: files.{key} must be true, false or null")
        elif key == "loras":
            value = _loras(value, where)
        elif key in FILE_LIST_KEYS:
            if not isinstance(value, list):
                raise MetadataError(f"{where}: files.{key} must be a list of file records")
            value = [_record(v, f"{key}[{i}]", where) for i, v in enumerate(value)]
        elif value is not None:
            if isinstance(value, str):  # written by sd3 before files were recorded by name
                value = {"name": Path(value).name, "sha256": None}
            value = _record(value, key, where)
        out[key] = value
    return out


def _is_record(value, fields: set[str]) -> bool:
    return (
        isinstance(value, dict)
        and set(value) == fields
        and isinstance(value["name"], str)
        and value["name"] not in ("", ".", "..")
        and Path(value["name"]).name == value["name"]
        and isinstance(value["sha256"], str | None)
    )


def _record(value, key: str, where: str) -> dict:
    if not _is_record(value, {"name", "sha256"}):
        raise MetadataError(
            f'{where}: files.{key} must be {{"name": FILE_NAME, "sha256": HASH}}, got {value!r}'
        )
    return value


def _loras(value, where: str) -> list[dict]:
    if not isinstance(value, list) or len(value) > MAX_LORAS:
        raise MetadataError(f"{where}: files.loras must be a list of at most {MAX_LORAS} LoRAs")
    for record in value:
        scale = record.get("scale") if isinstance(record, dict) else None
        if not (
            _is_record(record, {"name", "sha256", "scale"})
            and isinstance(scale, int | float)
            and not isinstance(scale, bool)
            and math.isfinite(scale)
        ):
            raise MetadataError(
                f'{where}: each of files.loras must be {{"name": FILE_NAME, "sha256": HASH, '
                f'"scale": NUMBER}}, got {record!r}'
            )
    return value
