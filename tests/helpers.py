"""Shared test utilities: official-layout key lists and error measures."""

from pathlib import Path

import torch

LAYOUTS = Path(__file__).resolve().parents[2] / "shared" / "reference" / "checkpoint-layouts"


def read_layout(name: str, strip_prefix: str = "") -> dict[str, tuple[int, ...]]:
    """Keys and shapes of an official file from `shared/reference/checkpoint-layouts/NAME.tsv`."""
    shapes = {}
    for line in (LAYOUTS / f"{name}.tsv").read_text().splitlines()[1:]:
        key, shape = line.split("\t")
        if key.startswith(strip_prefix):
            key = key[len(strip_prefix) :]
        shapes[key] = tuple(int(s) for s in shape.strip("[]").split(",") if s.strip())
    return shapes


def max_rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |ours - ref| / max |ref|: the error measure every parity test reports."""
    ours, ref = ours.detach().double(), ref.detach().double()
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return ((ours - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()
