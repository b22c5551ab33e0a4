"""A LoRA file matched against a model: what it changes, checked before any weight is read, and
the bookkeeping that keeps it from ever being a silent no-op.

`match` looks every module of the file up among the model's layers (`names.aliases`):
- a module whose update has another shape than its layer: one error naming both (a LoRA made
  for a model of another width);
- no module applying at all: one error naming the file, the format it was read as, the model it
  met and the model its names and shapes point to;
- some modules not applying (or tensors that are no LoRA weights): one warning with the count and
  the first few names.
The `LoRA` then records which modules were applied as the weights load (`merge_edits`) or as it is
put beside loaded layers (`install`), for the closing summary.
"""

import math
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from torch import Tensor, nn

from .formats import LoRAError, LoRAFile, Module
from .names import (
    COMPONENT_NAMES,
    Target,
    aliases,
    describe_format,
    describe_model,
    origin,
    scheme_of,
)
from .weights import Adapted, merge_into_bias, merge_into_weight, remove_adapted

EXAMPLES = 3  # names quoted in a warning


@dataclass(eq=False)
class LoRA:
    """One LoRA file matched against one model, at strength `scale`: `merged` into the weights
    as they load, or run beside them (`weights.Adapted`)."""

    file: LoRAFile
    scale: float
    merged: bool
    format: str  # e.g. "kohya LoRA"
    matches: dict[str, list[tuple[Module, Target]]]  # by component
    skipped: dict[str, list[str]] = field(default_factory=dict)  # reason -> module names
    applied: set[str] = field(default_factory=set)  # module names applied so far

    @property
    def path(self) -> Path:
        return self.file.path

    @property
    def name(self) -> str:
        return self.file.path.stem

    @property
    def module_count(self) -> int:
        return len(self.file.modules)

    def matched(self, component: str | None = None) -> int:
        if component is not None:
            return len(self.matches.get(component, []))
        return sum(len(v) for v in self.matches.values())

    def summary(self) -> str:
        """One line: which file, read as what, at which strength, and what it changed."""
        by_component = []
        for c in COMPONENT_NAMES:
            n = sum(1 for m, _ in self.matches.get(c, []) if m.key in self.applied)
            if n:
                by_component.append(f"{COMPONENT_NAMES[c]} {n}")
        line = (
            f"LoRA {self.path.name} ({self.format}, scale {self.scale:g}, "
            f"{'merged' if self.merged else 'not merged'}): changed {len(self.applied)} of its "
            f"{self.module_count} modules"
            + (f" ({', '.join(by_component)})" if by_component else "")
        )
        waiting = self.matched() - len(self.applied)
        if waiting:
            idle = [COMPONENT_NAMES[c] for c, items in self.matches.items()
                    if any(m.key not in self.applied for m, _ in items)]  # fmt: skip
            line += f"; {waiting} more for {', '.join(idle)}, which did not run"
        return line


def _rows_text(target: Target, out: int) -> str:
    if target.parts == 1:
        return ""
    rows = target.rows(out)
    return f" rows {rows.start}-{rows.stop - 1} (its part {target.part + 1} of {target.parts})"


def match(
    file: LoRAFile,
    layers: dict[str, dict[str, tuple[int, ...] | None]],
    depth: int,
    model_name: str = "",
    scale: float = 1.0,
    merged: bool = True,
    model: str | None = None,
) -> LoRA:
    """The file matched against a model's layers ({component: {our name: weight shape, or None
    where unknown}}; `depth`: its MMDiT's joint blocks; `model`: how messages name the model,
    by default "this <model_name> model (<depth> blocks, width <w>)"). Raises LoRAError where
    nothing applies or a shape differs; warns where some modules do not apply."""
    if not math.isfinite(scale):
        raise LoRAError(f"{file.path}: the LoRA scale must be a finite number, got {scale}")
    fmt = describe_format(file)
    model = model or f"this {describe_model(layers, model_name)}"
    if not file.modules:
        raise LoRAError(
            f"{file.path}: not a LoRA file: none of its {file.tensor_count} tensors is a LoRA "
            f"weight (no lora_up/lora_down, lora_A/lora_B, hada_, lokr_ or diff suffix; first "
            f"names {file.other[:EXAMPLES]})"
        )
    table = aliases(layers, depth)
    matches: dict[str, list[tuple[Module, Target]]] = defaultdict(list)
    skipped: dict[str, list[str]] = defaultdict(list)
    for key, module in file.modules.items():
        if module.problem:
            skipped[f"that cannot be applied ({module.problem})"].append(key)
            continue
        hit = table.get(key)
        if hit is None:
            scheme = scheme_of(key)
            if scheme is not None and scheme.component not in layers:
                skipped[f"for {COMPONENT_NAMES[scheme.component]}, which is not loaded"].append(key)
            else:
                skipped[f"with no layer in {model}"].append(key)
            continue
        target, _ = hit
        shape = layers[target.component][target.module]
        if shape is not None:
            out, inner = shape[0], math.prod(shape[1:])
            want = (out // target.parts, inner)
            got = module.shape if module.has_weight else (module.shape[0], inner)
            if got != want:
                raise LoRAError(
                    f"{file.path}: LoRA module {key} changes a {list(got)} weight, but the "
                    f"{COMPONENT_NAMES[target.component]} layer {target.module}"
                    f"{_rows_text(target, out)} it names is {list(want)} in {model}: the "
                    "LoRA was made for a model of another width"
                )
        matches[target.component].append((module, target))
    lora = LoRA(file, scale, merged, fmt, dict(matches), dict(skipped))
    n = len(file.modules)
    if not matches:
        reasons = "; ".join(f"{len(v)} {why}" for why, v in skipped.items())
        raise LoRAError(
            f"{file.path}: {fmt} with 0 of {n} modules matching {model}: it was made "
            f"for {origin(file)} ({reasons}; first names {list(file.modules)[:EXAMPLES]})"
        )
    if skipped or file.other:
        parts = [f"{len(v)} {why} (e.g. {v[:EXAMPLES]})" for why, v in skipped.items()]
        if file.other:
            parts.append(
                f"{len(file.other)} tensors that are no LoRA weights (e.g. {file.other[:EXAMPLES]})"
            )
        warnings.warn(
            f"{file.path}: {fmt}: {lora.matched()} of {n} modules apply; not applied: "
            + "; ".join(parts),
            stacklevel=2,
        )
    return lora


def _by_layer(
    loras: Iterable[LoRA], component: str
) -> dict[str, list[tuple[LoRA, Module, Target]]]:
    layers: dict[str, list[tuple[LoRA, Module, Target]]] = defaultdict(list)
    for lora in loras:
        for module, target in lora.matches.get(component, []):
            layers[target.module].append((lora, module, target))
    return layers


def _merged_weight(items, w: Tensor) -> Tensor:
    w = w.to(torch.float32, copy=True)  # never into the file's mapped pages; fp8 files too
    for lora, module, target in items:
        if module.has_weight:
            merge_into_weight(w, module, target, lora.scale)
        lora.applied.add(module.key)
    return w


def _merged_bias(items, b: Tensor) -> Tensor:
    b = b.to(torch.float32, copy=True)
    for lora, module, target in items:
        merge_into_bias(b, module, target, lora.scale)
        lora.applied.add(module.key)
    return b


def merge_edits(loras: Iterable[LoRA], component: str) -> dict[str, Callable[[Tensor], Tensor]]:
    """{state-dict key: the tensor as read -> the fp32 tensor with the merged LoRAs' updates},
    for `checkpoints.load_component`; LoRAs apply in the order given."""
    edits = {}
    for name, items in _by_layer([lo for lo in loras if lo.merged], component).items():
        edits[f"{name}.weight"] = partial(_merged_weight, items)
        if any(module.has_bias for _, module, _ in items):
            edits[f"{name}.bias"] = partial(_merged_bias, items)
    return edits


@torch.no_grad()
def merge_into_module(module: nn.Module, component: str, loras: Iterable[LoRA]) -> int:
    """Merge LoRAs into a loaded module's (floating-point) weights in place; returns the
    number of layers changed."""
    edits = merge_edits(loras, component)
    for key, edit in edits.items():
        name, _, leaf = key.rpartition(".")
        param = getattr(module.get_submodule(name), leaf)
        if param is None or not param.is_floating_point():
            raise LoRAError(f"{component} layer {name} has no floating-point {leaf} to merge into")
        param.copy_(edit(param))
    return len({k.rpartition(".")[0] for k in edits})


def install(
    module: nn.Module, component: str, loras: Iterable[LoRA], dtype: torch.dtype, device
) -> int:
    """Put the not-merged LoRAs beside the loaded module's layers (replacing any put there
    before); returns the number of layers adapted."""
    root = getattr(module, "_orig_mod", module)  # under torch.compile, the module it wraps
    remove_adapted(root)
    layers = _by_layer([lo for lo in loras if not lo.merged], component)
    for name, items in layers.items():
        parent, _, child = name.rpartition(".")
        owner = root.get_submodule(parent) if parent else root
        setattr(owner, child, Adapted(getattr(owner, child), items, dtype, torch.device(device)))
        for lora, m, _ in items:
            lora.applied.add(m.key)
    return len(layers)
