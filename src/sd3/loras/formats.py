"""LoRA files as the SD3 tools write them, read into one form: per adapted layer, its update.

A LoRA file holds, per adapted layer (a "module"), a few tensors named by the layer's name in the
tool's naming (`names.py` maps it onto ours) plus a suffix saying what each tensor is. Here the
tensors are grouped by module, the kind of update recognised from the suffixes, and each module's
scale resolved by the rules of the tool that wrote it. Only the safetensors header is read when a
file opens; the tensors are memory-mapped and read when an update is computed.

Kinds (ΔW adds to a layer's weight W [out, in], computed in fp32; a convolution's [out, in, kh, kw]
weight is taken as [out, in·kh·kw]):
- LoRA: up [out, r] @ down [r, in]. Suffixes `.lora_up/.lora_down.weight` (kohya, ComfyUI,
  OneTrainer), `.lora_B/.lora_A.weight` (PEFT, diffusers), older diffusers `.lora.up/.down`,
  `.lora_linear_layer.up/.down` and `_lora.up/.down`. PEFT's `lora_B.bias` adds to the bias.
- LyCORIS LoHa: (w1a @ w1b) ⊙ (w2a @ w2b), `.hada_w1_a` ... `.hada_w2_b`.
- LyCORIS LoKr: kron(w1, w2), each factor whole (`.lokr_w1`) or low-rank (`.lokr_w1_a @ .lokr_w1_b`).
- full: `.diff` (ΔW itself) and `.diff_b` (Δbias), ComfyUI's.
- DoRA (Liu et al. 2024): any of these plus a magnitude m, PEFT's `.lora_magnitude_vector` [out]
  or LyCORIS' `.dora_scale` ([out, 1] or [1, in]): the layer becomes W' = m ⊙ (W + ΔW) / ‖W + ΔW‖,
  the norm taken per output row or per input column as m's shape says (PEFT's and LyCORIS' rule).
Tucker-decomposed convolution updates (`.lora_mid`, `.hada_t1/t2`, `.lokr_t2`) are recognised and
refused by name: SD3 has one convolution (the patch embedder), and no SD3 tool writes them.

Scale, per module, as each tool computes it:
- an `.alpha` tensor: alpha / rank (LoRA: down's rows; LoHa: w1b's rows; LoKr: the rank of its
  low-rank factor, w2's if both are, and 1 when both factors are whole), alpha 0 counting as rank
  (kohya's rule: ComfyUI would make such a module a silent no-op);
- no alpha, LoRA: lora_alpha / r from the PEFT LoraConfig that newer diffusers store as JSON in
  the safetensors header (`lora_adapter_metadata`, `alpha_pattern` and `use_rslora` honoured), else
  1 (diffusers and ComfyUI take alpha = r when the file says nothing; kohya always writes alpha).
Then the user's strength s multiplies ΔW; with DoRA the layer becomes W + s·(W' − W), ComfyUI's
rule, which is DoRA itself at s = 1.
"""

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ..checkpoints import CheckpointError, LazyTensor, SafetensorsFile, from_file


class LoRAError(ValueError):
    """A LoRA file that cannot be applied or written, with the file named in the message."""


# suffix -> role, longest first so that e.g. ".lora_linear_layer.up.weight" wins over ".up.weight"
SUFFIXES = dict(
    sorted(
        {
            ".lora_down.weight": "down",
            ".lora_up.weight": "up",
            ".lora_A.weight": "down",
            ".lora_B.weight": "up",
            ".lora_B.bias": "up_bias",
            ".lora.down.weight": "down",
            ".lora.up.weight": "up",
            ".lora_linear_layer.down.weight": "down",
            ".lora_linear_layer.up.weight": "up",
            "_lora.down.weight": "down",
            "_lora.up.weight": "up",
            ".lora_mid.weight": "mid",
            ".alpha": "alpha",
            ".dora_scale": "magnitude",
            ".lora_magnitude_vector": "magnitude",
            ".hada_w1_a": "hada_w1_a",
            ".hada_w1_b": "hada_w1_b",
            ".hada_w2_a": "hada_w2_a",
            ".hada_w2_b": "hada_w2_b",
            ".hada_t1": "hada_t1",
            ".hada_t2": "hada_t2",
            ".lokr_w1": "lokr_w1",
            ".lokr_w1_a": "lokr_w1_a",
            ".lokr_w1_b": "lokr_w1_b",
            ".lokr_w2": "lokr_w2",
            ".lokr_w2_a": "lokr_w2_a",
            ".lokr_w2_b": "lokr_w2_b",
            ".lokr_t2": "lokr_t2",
            ".diff": "diff",
            ".diff_b": "diff_b",
        }.items(),
        key=lambda item: -len(item[0]),
    )
)
KIND_NAMES = {"lora": "LoRA", "loha": "LyCORIS LoHa", "lokr": "LyCORIS LoKr", "full": "full-weight"}
TUCKER = ("mid", "hada_t1", "hada_t2", "lokr_t2")
PEFT_METADATA = "lora_adapter_metadata"  # diffusers' header key for the LoraConfig JSON


def split_key(key: str) -> tuple[str, str] | None:
    """(module, role) of a tensor name, or None where the suffix is no LoRA tensor's."""
    for suffix, role in SUFFIXES.items():
        if key.endswith(suffix) and len(key) > len(suffix):
            return key[: -len(suffix)], role
    return None


@dataclass
class Module:
    """One adapted layer's tensors in a LoRA file, and what they add to the layer."""

    key: str  # the layer's name in the file: its tensors' names less their suffixes
    tensors: dict[str, LazyTensor]  # by role ("down", "up", "alpha", "hada_w1_a", ...)
    kind: str = ""  # "lora", "loha", "lokr", "full"; "" when the tensors make no update
    problem: str = ""  # why the module cannot be applied, if it cannot
    scale: float = 1.0  # the format's own factor (alpha / rank ...), before the user's strength
    shape: tuple[int, int] = (0, 0)  # (out, in) of ΔW, a convolution's in being in·kh·kw

    @property
    def magnitude(self) -> LazyTensor | None:
        """DoRA's magnitude vector, if the module is a DoRA."""
        return self.tensors.get("magnitude")

    @property
    def rank(self) -> int | None:
        t = self.tensors
        if self.kind == "lora":
            return t["down"].shape[0]
        if self.kind == "loha":
            return t["hada_w1_b"].shape[0]
        if self.kind == "lokr":
            low = t.get("lokr_w2_b") or t.get("lokr_w1_b")
            return low.shape[0] if low is not None else None
        return None

    @property
    def has_bias(self) -> bool:
        return "up_bias" in self.tensors or "diff_b" in self.tensors

    @property
    def has_weight(self) -> bool:
        return self.kind != "full" or "diff" in self.tensors

    def read(self, role: str) -> Tensor:
        return self.tensors[role].read().to(torch.float32)

    def factors(self) -> tuple[Tensor, Tensor]:
        """A LoRA's (down [r, in], up [out, r]) in fp32, the scale folded into up."""
        return self.read("down").flatten(1), self.scale * self.read("up").flatten(1)

    def delta(self) -> Tensor:
        """ΔW [out, in] in fp32, scale included."""
        if self.kind == "lora":
            down, up = self.factors()
            return up @ down
        if self.kind == "loha":
            w1 = self.read("hada_w1_a") @ self.read("hada_w1_b").flatten(1)
            w2 = self.read("hada_w2_a") @ self.read("hada_w2_b").flatten(1)
            return self.scale * (w1 * w2)
        if self.kind == "lokr":
            w1, w2 = self._lokr_factor(1), self._lokr_factor(2)
            return self.scale * torch.kron(w1, w2.flatten(1))
        return self.read("diff").flatten(1)

    def _lokr_factor(self, i: int) -> Tensor:
        if f"lokr_w{i}" in self.tensors:
            return self.read(f"lokr_w{i}")
        return self.read(f"lokr_w{i}_a") @ self.read(f"lokr_w{i}_b").flatten(1)

    def bias_delta(self) -> Tensor | None:
        """Δbias [out] in fp32, or None."""
        if "up_bias" in self.tensors:
            return self.scale * self.read("up_bias")
        if "diff_b" in self.tensors:
            return self.read("diff_b")
        return None

    def magnitude_axis(self) -> str:
        """Where DoRA's norm is taken: "columns", per input column (LyCORIS' [1, in]), else
        "rows", per output row (PEFT's [out], [1, out, 1, 1] on a convolution; LyCORIS'
        [out, 1] with wd_on_out)."""
        shape = self.magnitude.shape
        return "columns" if shape == (1, self.shape[1]) and self.shape[0] != 1 else "rows"


def _describe(tensors: Mapping[str, LazyTensor]) -> str:
    return ", ".join(f"{role} {list(t.shape)}" for role, t in tensors.items())


def _classify(m: Module) -> None:
    """Set the module's kind and ΔW shape, or its problem, from the roles and shapes alone."""
    t, roles = m.tensors, set(m.tensors)
    if roles & set(TUCKER):
        m.problem = "Tucker-decomposed convolution updates are not supported"
        return
    kinds = {
        "lora": roles & {"down", "up", "up_bias"},
        "loha": {r for r in roles if r.startswith("hada_")},
        "lokr": {r for r in roles if r.startswith("lokr_")},
        "full": roles & {"diff", "diff_b"},
    }
    present = [k for k, v in kinds.items() if v]
    if len(present) != 1:
        m.problem = (
            "it mixes " + " and ".join(KIND_NAMES[k] for k in present) + " tensors"
            if present
            else "it holds no update, only " + ", ".join(sorted(roles))
        )
        return
    m.kind = kind = present[0]
    need = {
        "lora": {"down", "up"},
        "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"},
        "lokr": set(),
        "full": set(),
    }[kind]
    if kind == "lokr":
        for i in (1, 2):
            if f"lokr_w{i}" not in roles and not {f"lokr_w{i}_a", f"lokr_w{i}_b"} <= roles:
                need |= {f"lokr_w{i}"}
    missing = need - roles
    if missing:
        m.problem = f"it lacks {', '.join(sorted(missing))} (has {_describe(t)})"
        m.kind = ""
        return
    try:
        m.shape = _delta_shape(kind, t)
    except ValueError as e:
        m.problem = f"its tensors do not fit together: {e} ({_describe(t)})"
        m.kind = ""
        return
    if m.magnitude is not None:
        mag = m.magnitude.shape
        out, inner = m.shape
        by_rows = math.prod(mag) == out and sorted(mag)[:-1] == [1] * (len(mag) - 1)
        if not (by_rows or mag == (1, inner)):
            m.problem = f"its DoRA magnitude {list(mag)} has neither {out} rows nor {inner} columns"
            m.kind = ""


def _delta_shape(kind: str, t: Mapping[str, LazyTensor]) -> tuple[int, int]:
    def inner(shape) -> int:
        return math.prod(shape[1:])

    if kind == "lora":
        down, up = t["down"].shape, t["up"].shape
        if len(up) < 2 or up[1] != down[0] or math.prod(up[2:]) != 1:
            raise ValueError(f"up {list(up)} does not take down's rank {down[0]}")
        out = up[0]
        if "up_bias" in t and t["up_bias"].shape != (out,):
            raise ValueError(f"the bias {list(t['up_bias'].shape)} is not [{out}]")
        return out, inner(down)
    if kind == "loha":
        a1, b1, a2, b2 = (t[f"hada_w{i}_{x}"].shape for i in (1, 2) for x in "ab")
        if a1[1] != b1[0] or a2[1] != b2[0] or a1[0] != a2[0] or inner(b1) != inner(b2):
            raise ValueError("the two Hadamard factors differ in shape")
        return a1[0], inner(b1)
    if kind == "lokr":
        shapes = []
        for i in (1, 2):
            if f"lokr_w{i}" in t:
                shapes.append((t[f"lokr_w{i}"].shape[0], inner(t[f"lokr_w{i}"].shape)))
            else:
                a, b = t[f"lokr_w{i}_a"].shape, t[f"lokr_w{i}_b"].shape
                if a[1] != b[0]:
                    raise ValueError(f"lokr_w{i}_a {list(a)} does not take lokr_w{i}_b's rank")
                shapes.append((a[0], inner(b)))
        (o1, i1), (o2, i2) = shapes
        return o1 * o2, i1 * i2
    diff = t.get("diff")
    return (diff.shape[0], inner(diff.shape)) if diff is not None else (t["diff_b"].shape[0], 0)


def _alpha_scale(m: Module, alpha: float) -> float:
    """alpha / rank by the module's kind; alpha 0 counts as rank (kohya's rule)."""
    rank = m.rank
    if m.kind == "full" or rank is None:  # a full update, or a LoKr of two whole factors
        return 1.0
    return alpha / rank if alpha else 1.0


def peft_scale(config: Mapping, path: str, rank: int) -> float | None:
    """PEFT's scale for the module at `path` (its name inside the adapted model): lora_alpha,
    or the `alpha_pattern` entry that matches the name's tail, over r (√r with `use_rslora`)."""
    alpha = config.get("lora_alpha")
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.fullmatch(rf"(.*\.)?({pattern})", path):  # peft.utils.other.get_pattern_key
            alpha = value
            break
    if not isinstance(alpha, int | float) or isinstance(alpha, bool):
        return None
    return alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)


def peft_config_for(metadata: Mapping, key: str) -> tuple[Mapping, str]:
    """The LoraConfig (as a dict) that covers module `key`, and the module's name inside its
    model. diffusers prefixes each model's config entries ("transformer.lora_alpha") when a
    pipeline saves; a model saved alone has them bare."""
    prefix, _, rest = key.partition(".")
    prefixed = {k[len(prefix) + 1 :]: v for k, v in metadata.items() if k.startswith(prefix + ".")}
    config, path = (prefixed, rest) if prefixed else (metadata, key)
    return config, path.removeprefix("base_model.model.")


@dataclass
class LoRAFile:
    """A LoRA file's modules, the tensors that are no LoRA tensor, and its header metadata."""

    path: Path
    modules: dict[str, Module]
    other: list[str] = field(default_factory=list)  # tensor names with no LoRA suffix
    metadata: dict[str, str] = field(default_factory=dict)
    tensor_count: int = 0

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def kinds(self) -> list[str]:
        """The kinds of update present, DoRA noted: e.g. ["LoRA"], ["DoRA (LoRA)"]."""
        found = []
        for m in self.modules.values():
            if m.kind:
                name = KIND_NAMES[m.kind]
                name = f"DoRA ({name})" if m.magnitude is not None else name
                if name not in found:
                    found.append(name)
        order = [n for k in KIND_NAMES.values() for n in (k, f"DoRA ({k})")]
        return sorted(found, key=order.index) or ["LoRA"]

    @property
    def has_dora(self) -> bool:
        return any(m.magnitude is not None for m in self.modules.values() if m.kind)

    @classmethod
    def open(cls, path: str | Path) -> "LoRAFile":
        """Read a LoRA file's header (no tensor data): one LoRAError naming it if it is unusable.
        Pickle files are refused, never unpickled (`checkpoints.SafetensorsFile`)."""
        try:
            file = SafetensorsFile(path)
        except CheckpointError as e:
            raise LoRAError(str(e)) from None
        tensors = {k: from_file(file, k) for k in file.tensors}
        return cls.from_tensors(tensors, file.metadata, file.path)

    @classmethod
    def from_tensors(
        cls,
        tensors: Mapping[str, LazyTensor | Tensor],
        metadata: Mapping[str, str] | None = None,
        path: str | Path = "<tensors>",
    ) -> "LoRAFile":
        """The same from tensors in memory (e.g. a LoRA just trained)."""
        metadata = dict(metadata or {})
        path = Path(path)
        grouped: dict[str, dict[str, LazyTensor]] = {}
        other = []
        for key, t in tensors.items():
            if isinstance(t, Tensor):
                t = LazyTensor(tuple(t.shape), t.dtype, key, lambda t=t: t)
            parts = split_key(key)
            if parts is None:
                other.append(key)
                continue
            module, role = parts
            grouped.setdefault(module, {})[role] = t
        peft = _peft_metadata(metadata, path)
        modules = {}
        for key, roles in grouped.items():
            m = modules[key] = Module(key, roles)
            _classify(m)
            if not m.kind:
                continue
            if "alpha" in roles:
                alpha = roles["alpha"]
                if math.prod(alpha.shape) != 1:
                    m.problem, m.kind = (
                        f"its alpha has shape {list(alpha.shape)}, not one value",
                        "",
                    )
                    continue
                m.scale = _alpha_scale(m, float(alpha.read().float().reshape(())))
            elif m.kind == "lora" and peft and "down" in roles:
                config, inside = peft_config_for(peft, key)
                scale = peft_scale(config, inside, m.rank)
                m.scale = 1.0 if scale is None else scale
            if not math.isfinite(m.scale):
                m.problem, m.kind = f"its scale {m.scale} is not a finite number", ""
        return cls(path, modules, other, metadata, len(tensors))


def _peft_metadata(metadata: Mapping[str, str], path: Path) -> dict:
    text = metadata.get(PEFT_METADATA)
    if not text:
        return {}
    try:
        config = json.loads(text)
    except ValueError as e:
        raise LoRAError(f"{path}: its {PEFT_METADATA} header is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise LoRAError(f"{path}: its {PEFT_METADATA} header is not a JSON object")
    return config
