"""Batch generation from a prompt file (`sd3 generate --prompts FILE --out-dir DIR`), data-parallel
under torchrun.

The file holds one prompt a line, or (a `.jsonl` file) one JSON object a line with the prompt and
its own settings. Every (line, seed) is one job and one image, `DIR/{line:05d}_{seed}.png`; a job
whose file exists is done, so a killed run resumes where it stopped. Each image is generated
alone from its own seed, so which process makes it does not change its bytes: rank r of N takes
every N-th job still to do (`sd3.distributed.share`).
"""

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

from .pipeline import MAX_SEED, Settings, check_settings

# JSONL keys -> Settings fields; the types each takes
KEYS = {
    "prompt": ("prompt", str), "negative": ("negative_prompt", str), "steps": ("steps", int),
    "cfg": ("cfg", float), "cfg_start": ("cfg_start", float), "cfg_end": ("cfg_end", float),
    "sampler": ("sampler", str), "shift": ("shift", float), "width": ("width", int),
    "height": ("height", int), "t5_length": ("t5_length", int),
}  # fmt: skip
SEED_KEYS = ("seed", "seeds")


@dataclass(frozen=True)
class Line:
    """One prompt of the file: its line number (from 1), settings given on it and its seeds
    (None: the command line's)."""

    number: int
    settings: dict
    seeds: tuple[int, ...] | None = None


@dataclass(frozen=True)
class Job:
    line: int
    seed: int
    settings: Settings
    name: str


def image_name(line: int, seed: int) -> str:
    return f"{line:05d}_{seed}.png"


def read_prompts(path: str | Path) -> list[Line]:
    """The prompts of `path`, blank lines left out; one ValueError naming the line for the first
    line that is not a prompt."""
    path = Path(path)
    where = f"--prompts {path}"
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except FileNotFoundError:
        raise ValueError(f"{where}: no such file") from None
    except IsADirectoryError:
        raise ValueError(f"{where} is a folder, not a file") from None
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise ValueError(f"{where} line {line}: not UTF-8 text") from None
    jsonl = path.suffix.lower() == ".jsonl"
    lines = []
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        if not jsonl:
            lines.append(Line(number, {"prompt": raw.strip()}))
            continue
        try:
            entry = json.loads(raw)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where} line {number}: not JSON ({e.msg})") from None
        try:
            lines.append(parse_entry(number, entry))
        except ValueError as e:
            raise ValueError(f"{where} line {number}: {e}") from None
    if not lines:
        raise ValueError(f"{where}: no prompts in it")
    return lines


def parse_entry(number: int, entry: object) -> Line:
    """A JSONL line's object as a Line; ValueError naming the key that is wrong."""
    if not isinstance(entry, dict):
        raise ValueError(f'expected an object such as {{"prompt": "a cat"}}, got {entry!r}')
    unknown = sorted(set(entry) - set(KEYS) - set(SEED_KEYS))
    if unknown:
        raise ValueError(
            f"unknown key {unknown[0]!r}; the keys are {', '.join([*KEYS, *SEED_KEYS])}"
        )
    if "prompt" not in entry:
        raise ValueError('no "prompt"')
    if "seed" in entry and "seeds" in entry:
        raise ValueError('give "seed" or "seeds", not both')
    settings = {}
    for key, value in entry.items():
        if key in SEED_KEYS:
            continue
        field, kind = KEYS[key]
        settings[field] = typed(key, value, kind)
    seeds = None
    if "seed" in entry:
        seeds = (seed_value("seed", entry["seed"]),)
    elif "seeds" in entry:
        if not isinstance(entry["seeds"], list) or not entry["seeds"]:
            raise ValueError(f'"seeds" must be a non-empty list of seeds, got {entry["seeds"]!r}')
        seeds = tuple(seed_value("seeds", s) for s in entry["seeds"])
        if len(set(seeds)) != len(seeds):
            raise ValueError(f'"seeds" lists a seed twice: {list(seeds)}')
    return Line(number, settings, seeds)


def typed(key: str, value: object, kind: type) -> object:
    if kind is str and isinstance(value, str):
        return value
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind is float and isinstance(value, int | float) and not isinstance(value, bool):
        if math.isfinite(value):
            return float(value)
    what = {str: "a string", int: "a whole number", float: "a finite number"}[kind]
    raise ValueError(f'"{key}" must be {what}, got {value!r}')


def seed_value(key: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SEED:
        raise ValueError(f'"{key}": seeds are whole numbers from 0 to 2**63 - 1, got {value!r}')
    return value


def jobs(
    lines: list[Line], base: Settings, seeds: tuple[int, ...], config, path: Path
) -> list[Job]:
    """Every (line, seed) as a job with its settings, each checked against the model (`config`);
    the first impossible one is a ValueError naming its line. `seeds` serve lines without any."""
    out = []
    for line in lines:
        s = replace(base, **line.settings, num_images=1)
        for seed in line.seeds or seeds:
            job = replace(s, seed=seed)
            try:
                check_settings(job, config, has_init_image=False)
            except ValueError as e:
                raise ValueError(f"--prompts {path} line {line.number}: {e}") from None
            out.append(Job(line.number, seed, job, image_name(line.number, seed)))
    return out
