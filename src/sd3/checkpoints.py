"""Checkpoint files as users download them, mapped onto our modules.

Layouts read:
- Stability single files: `model.diffusion_model.*` (MMDiT), `first_stage_model.*` (VAE) and,
  optionally bundled, `text_encoders.{clip_l,clip_g,t5xxl}.transformer.*`;
- standalone files without prefix: clip_l / clip_g / t5xxl (transformers naming), a VAE or an MMDiT;
- diffusers folders (`transformer/`, `vae/`, `text_encoder{,_2,_3}/`, sharded `*.index.json` too),
  whose MMDiT and VAE names are mapped to Stability's here;
- GGUF files (`sd3.gguf`) in the same layouts: stable-diffusion.cpp's (Stability's names, a
  single file or one component), ComfyUI-GGUF's (an MMDiT with bare `joint_blocks.*` names) and
  llama.cpp's T5 names (`enc.blk.*`, ComfyUI-GGUF's T5-XXL files);
- ControlNets (`open_controlnet`): Stability's SD3.5 files (no prefix, diffusers names for the
  embedders, Stability's for the blocks, an int `control_type`) and diffusers' files and folders
  (SD3.5 and InstantX), mapped to Stability's names with the MMDiT's map.

Files are parsed from their safetensors or GGUF header and memory-mapped; a tensor is converted to
the compute dtype once (a GGUF block-quantized one dequantized straight into it), and one already
in that dtype is used in place. Pickle files are refused, never unpickled.
Model configurations are inferred from tensor shapes, so reduced-size checkpoints load too.
"""

import json
import math
import mmap
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from .gguf import GGUFError, GGUFFile, is_gguf, transformers_name
from .kernels.quantization import (
    SCALE,
    pack_for_int8_gemm,
    quantize_int4,
    quantize_weight,
    use_int4,
    use_int8,
)
from .models.clip import CLIPConfig, CLIPTextModel
from .models.controlnet import CONTROL_TYPES, ControlNet, ControlNetConfig
from .models.mmdit import MMDiT, MMDiTConfig
from .models.t5 import T5Config, T5Encoder
from .models.vae import AutoEncoder, VAEConfig


class CheckpointError(ValueError):
    """A checkpoint file or folder that cannot be used, with the file named in the message."""


COMPONENTS = ("mmdit", "vae", "clip_l", "clip_g", "t5xxl")

SINGLE_FILE_PREFIXES = {
    "mmdit": "model.diffusion_model.",
    "vae": "first_stage_model.",
    "clip_l": "text_encoders.clip_l.transformer.",
    "clip_g": "text_encoders.clip_g.transformer.",
    "t5xxl": "text_encoders.t5xxl.transformer.",
}

DIFFUSERS_FOLDERS = {
    "mmdit": "transformer",
    "vae": "vae",
    "clip_l": "text_encoder",
    "clip_g": "text_encoder_2",
    "t5xxl": "text_encoder_3",
}

# Keys real files carry that our modules do not need.
HARMLESS_EXTRAS = re.compile(r"(^|\.)(position_ids|logit_scale)$|^shared\.weight$")

PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle"}

# Compute and storage dtypes by the names the CLI and the exporter take.
DTYPE_NAMES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# safetensors dtype strings
DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class TensorInfo:
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


class SafetensorsFile:
    """One safetensors file: header validated on open, tensors memory-mapped on demand."""

    def __init__(self, path: str | Path):
        self.path = path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"{path}: no such file")
        with open(path, "rb") as f:
            head = f.read(9)
            looks_pickled = head[8:9] != b"{" and (head[:2] == b"PK" or head[:1] == b"\x80")
            if path.suffix.lower() in PICKLE_SUFFIXES or looks_pickled:
                raise CheckpointError(
                    f"{path}: this is a pickle (PyTorch .ckpt/.pt/.bin) checkpoint; sd3 never unpickles "
                    "files, since loading a pickle can run arbitrary code. Use the .safetensors release."
                )
            size = path.stat().st_size
            n = int.from_bytes(head[:8], "little") if len(head) == 9 else -1
            if n < 2 or n > size - 8:
                raise CheckpointError(
                    f"{path}: not a safetensors file (or truncated): no valid header"
                )
            try:
                f.seek(8)
                header = json.loads(f.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
        self.metadata = header.pop("__metadata__", None) or {}
        self.data_start = 8 + n
        data_size = size - self.data_start
        self.tensors: dict[str, TensorInfo] = {}
        for key, entry in header.items():
            self.tensors[key] = info = self._parse_entry(key, entry)
            if info.end > data_size:
                raise CheckpointError(
                    f"{path}: truncated: tensor {key!r} ends at byte {info.end} of the data section, "
                    f"but the file holds only {data_size} bytes of data"
                )
        self._mmap: mmap.mmap | None = None

    def _parse_entry(self, key: str, entry: object) -> TensorInfo:
        try:
            dtype = DTYPES[entry["dtype"]]
            shape = tuple(int(s) for s in entry["shape"])
            begin, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(
                f"{self.path}: corrupt safetensors header: bad entry for tensor {key!r}: {str(entry)[:200]}"
            ) from None
        nbytes = math.prod(shape) * dtype.itemsize
        if begin < 0 or end - begin != nbytes:
            raise CheckpointError(
                f"{self.path}: corrupt safetensors header: tensor {key!r} of shape {list(shape)} "
                f"needs {nbytes} bytes but its offsets span {end - begin}"
            )
        return TensorInfo(dtype, shape, begin, end)

    def get(self, key: str) -> Tensor:
        """The tensor backed by the memory-mapped file (copy-on-write: the file is never changed)."""
        info = self.tensors[key]
        if info.begin == info.end:
            return torch.empty(info.shape, dtype=info.dtype)
        if self._mmap is None:
            with open(self.path, "rb") as f:
                self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        flat = torch.frombuffer(
            self._mmap,
            dtype=info.dtype,
            count=math.prod(info.shape),
            offset=self.data_start + info.begin,
        )
        return flat.view(info.shape)

    def release(self, key: str) -> None:
        """Drop the pages of tensor `key` from this process's memory (MADV_DONTNEED). They are
        clean copy-on-write pages of the file, so a later read faults them in again from the file
        (or the page cache); only pages wholly inside the tensor are dropped."""
        if self._mmap is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        info = self.tensors[key]
        page = mmap.PAGESIZE
        start = -(-(self.data_start + info.begin) // page) * page
        end = (self.data_start + info.end) // page * page
        if end > start:
            self._mmap.madvise(mmap.MADV_DONTNEED, start, end - start)


def _nothing() -> None:
    pass


@dataclass
class LazyTensor:
    """A tensor not read yet: its shape, stored dtype, where it comes from and how to read it.
    `mapped`: `read()` returns a view of the memory-mapped file (else a new tensor); `release()`
    drops the file pages it read from this process's memory."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    origin: str
    read: Callable[[], Tensor]
    mapped: bool = False
    release: Callable[[], None] = _nothing
    # GGUF block-quantized tensors: the ggml type's name, the dequantization straight into a
    # dtype, and the stored blocks ([rows, bytes], for `--int4` to take Q4_0 blocks as they are)
    quant: str | None = None
    read_as: Callable[[torch.dtype], Tensor] | None = None
    blocks: Callable[[], Tensor] | None = None

    def read_in(self, dtype: torch.dtype) -> Tensor:
        """The tensor in `dtype` (a quantized one dequantized into it, no float32 copy whole)."""
        return self.read_as(dtype) if self.read_as else self.read().to(dtype)

    @property
    def stored(self) -> str:
        """How the file stores it: a dtype ("bf16"-style torch name) or a GGUF type."""
        return self.quant or str(self.dtype).removeprefix("torch.")


WeightsFile = SafetensorsFile | GGUFFile


def from_file(file: WeightsFile, key: str) -> LazyTensor:
    origin = f"{file.path}:{key}"
    info = file.tensors[key]
    if isinstance(file, SafetensorsFile):
        return LazyTensor(
            info.shape, info.dtype, origin, lambda: file.get(key), True, lambda: file.release(key)
        )
    release = lambda: file.release(key)  # noqa: E731
    if info.type.dtype is not None:  # F32 / F16 / BF16: used in place like safetensors'
        return LazyTensor(info.shape, info.type.dtype, origin, lambda: file.get(key), True, release)
    return LazyTensor(
        info.shape, torch.float32, origin, lambda: file.get(key), False, release,
        info.type.name, lambda dtype: file.get(key, dtype), lambda: file.raw(key),
    )  # fmt: skip


def open_weights(path: str | Path) -> WeightsFile:
    """A safetensors or GGUF file (told apart by their first bytes)."""
    path = Path(path)
    if path.is_file() and (path.suffix.lower() == ".gguf" or is_gguf(path)):
        try:
            return GGUFFile(path)
        except GGUFError as e:
            raise CheckpointError(str(e)) from None
    return SafetensorsFile(path)


def gguf_metadata(file: WeightsFile) -> dict[str, str]:
    if isinstance(file, SafetensorsFile):
        return file.metadata
    return {k: str(v) for k, v in file.metadata.items()}


def derived(
    t: LazyTensor, shape: tuple[int, ...], read: Callable[[], Tensor], parts=None
) -> LazyTensor:
    """A tensor computed from `parts` (default: `t`) when read: a new tensor, not a file view."""
    parts = parts or [t]

    def release() -> None:
        for part in parts:
            part.release()

    return LazyTensor(shape, t.dtype, t.origin, read, False, release)


def concat(parts: Sequence[LazyTensor]) -> LazyTensor:
    """Parts stacked along dim 0 (diffusers' separate q, k, v into Stability's fused qkv)."""
    shape = (sum(p.shape[0] for p in parts), *parts[0].shape[1:])
    return derived(parts[0], shape, lambda: torch.cat([p.read() for p in parts]), list(parts))


def reshaped(t: LazyTensor, shape: tuple[int, ...]) -> LazyTensor:
    return LazyTensor(
        shape, t.dtype, t.origin, lambda: t.read().reshape(shape), t.mapped, t.release
    )


@dataclass
class Component:
    """One network's tensors, in our (Stability / transformers) naming."""

    name: str
    files: list[Path]
    tensors: dict[str, LazyTensor] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)  # the safetensors header's __metadata__
    control_type: str | None = None  # a ControlNet's, as its file records it (blur, canny, depth)

    def release(self) -> None:
        """Drop every file page of this component from the process's memory (after its module
        is gone, or to page it out: a tensor used in place faults back in from the file)."""
        for t in self.tensors.values():
            t.release()

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: t.shape for k, t in self.tensors.items()}

    @property
    def stored_dtypes(self) -> list[str]:
        """The dtypes and GGUF types the files store this component's tensors in."""
        return sorted({t.stored for t in self.tensors.values()})

    @property
    def num_params(self) -> int:
        return sum(
            math.prod(t.shape) for k, t in self.tensors.items() if not HARMLESS_EXTRAS.search(k)
        )

    def where(self) -> str:
        return ", ".join(str(f) for f in self.files)


# ---------------------------------------------------------------------------------------------
# Finding the components in files and folders


def kind_of_standalone(shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    """Which network an unprefixed file holds, from its key names."""
    keys = shapes.keys()
    if any(k.startswith("controlnet_blocks.") for k in keys):
        return "controlnet"
    if any(k.startswith("joint_blocks.") for k in keys):
        return "mmdit"
    if any(k.startswith("transformer_blocks.") for k in keys):
        return "diffusers_mmdit"
    if any(k.startswith("encoder.down.") or k.startswith("decoder.up.") for k in keys):
        return "vae"
    if any(
        k.startswith("encoder.down_blocks.") or k.startswith("decoder.up_blocks.") for k in keys
    ):
        return "diffusers_vae"
    if any(k.startswith("encoder.block.") for k in keys):
        return "t5xxl"
    if "text_model.embeddings.token_embedding.weight" in shapes:
        width = shapes["text_model.embeddings.token_embedding.weight"][1]
        return {768: "clip_l", 1280: "clip_g"}.get(width, "clip")
    return None


def open_file(path: str | Path, role: str | None = None) -> dict[str, Component]:
    """The components in one safetensors or GGUF file. `role` says what a standalone file is
    meant to be (e.g. "clip_g" for `--clip-g FILE`) and is checked against what the file holds."""
    file = open_weights(path)
    metadata = gguf_metadata(file)
    found: dict[str, Component] = {}
    rest = []
    for key in file.tensors:
        for name, prefix in SINGLE_FILE_PREFIXES.items():
            if key.startswith(prefix):
                comp = found.setdefault(name, Component(name, [file.path], metadata=metadata))
                comp.tensors[key[len(prefix) :]] = from_file(file, key)
                break
        else:
            rest.append(key)
    if found:
        unknown = [k for k in rest if not HARMLESS_EXTRAS.search(k)]
        if unknown:
            warnings.warn(
                f"{file.path}: ignoring {len(unknown)} tensors outside the SD3 components, e.g. {unknown[:3]}",
                stacklevel=2,
            )
    else:
        tensors = {k: from_file(file, k) for k in rest}
        if isinstance(file, GGUFFile) and any(k.startswith("enc.blk.") for k in rest):
            tensors = {transformers_name(k): t for k, t in tensors.items()}  # llama.cpp's T5
        kind = kind_of_standalone({k: t.shape for k, t in tensors.items()})
        if kind == "controlnet":
            raise CheckpointError(
                f"{file.path}: this is a ControlNet: give it with --controlnet (Python: controlnets=)"
            )
        if kind == "diffusers_mmdit":
            kind, tensors = "mmdit", mmdit_from_diffusers(tensors)
        elif kind == "diffusers_vae":
            kind, tensors = "vae", vae_from_diffusers(tensors)
        if kind == "clip" and role in ("clip_l", "clip_g"):
            kind = role  # a reduced-width CLIP: its role comes from the option it was given with
        if kind is None or kind == "clip":
            raise CheckpointError(
                f"{file.path}: unknown model: its {len(rest)} tensors are not an SD3 MMDiT, VAE, "
                f"CLIP-L, CLIP-G or T5-XXL (first keys: {rest[:3]})"
            )
        found[kind] = Component(kind, [file.path], tensors, metadata)
    if role is not None and role not in found:
        raise CheckpointError(
            f"{file.path}: expected a {role} file, but it holds {', '.join(found)}"
        )
    return {role: found[role]} if role else found


def open_folder(path: Path) -> dict[str, Component]:
    """The components of a diffusers folder (each subfolder optional)."""
    found = {}
    for name, sub in DIFFUSERS_FOLDERS.items():
        folder = path / sub
        if not folder.is_dir():
            continue
        files = sharded_files(folder)
        comp = Component(name, files)
        for f in files:
            st = SafetensorsFile(f)
            comp.tensors.update((k, from_file(st, k)) for k in st.tensors)
        if name == "mmdit":
            comp.tensors = mmdit_from_diffusers(comp.tensors)
        elif name == "vae":
            comp.tensors = vae_from_diffusers(comp.tensors)
        found[name] = comp
    if not found:
        raise CheckpointError(
            f"{path}: not a diffusers SD3 folder: none of {', '.join(DIFFUSERS_FOLDERS.values())}/ is there"
        )
    return found


def sharded_files(folder: Path) -> list[Path]:
    """The safetensors files of one diffusers subfolder: an index's shards, or the single file."""
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        try:
            weight_map = json.loads(indexes[0].read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{indexes[0]}: corrupt shard index ({e})") from None
        return [folder / name for name in sorted(set(weight_map.values()))]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickles = [f.name for f in folder.iterdir() if f.suffix in PICKLE_SUFFIXES]
        why = f" (only pickle files {pickles}, which sd3 never loads)" if pickles else ""
        raise CheckpointError(f"{folder}: no .safetensors weights{why}")
    if len(files) > 1:  # e.g. both model.safetensors and model.fp16.safetensors: take the first
        files = files[:1]
    return files


def find_components(
    model: str | Path | None = None,
    clip_l: str | Path | None = None,
    clip_g: str | Path | None = None,
    t5xxl: str | Path | None = None,
    vae: str | Path | None = None,
) -> dict[str, Component]:
    """All components from a model file or diffusers folder plus separate files; a separate file
    replaces the same component bundled in the model file."""
    found: dict[str, Component] = {}
    if model is not None:
        path = Path(model)
        if not path.exists():
            raise CheckpointError(f"{path}: no such file or folder")
        found.update(open_folder(path) if path.is_dir() else open_file(path))
    for role, path in (("clip_l", clip_l), ("clip_g", clip_g), ("t5xxl", t5xxl), ("vae", vae)):
        if path is not None:
            try:
                found.update(open_file(path, role=role))
            except CheckpointError as e:
                raise CheckpointError(f"{role} (--{role.replace('_', '-')}) {e}") from None
    t5 = found.get("t5xxl")
    if t5 is not None and not {"encoder.embed_tokens.weight", "shared.weight"} & set(t5.tensors):
        # stable-diffusion.cpp's converter leaves T5's token embedding out as unused
        warnings.warn(
            f"{t5.files[0]}: its T5-XXL has no token embedding (encoder.embed_tokens.weight), as "
            "stable-diffusion.cpp's converter writes it: T5 is left out (zeros in its place, as "
            "--no-t5); give a whole T5-XXL with --t5xxl FILE to use it",
            stacklevel=2,
        )
        del found["t5xxl"]
    return found


# ---------------------------------------------------------------------------------------------
# diffusers names <-> Stability names

# The MMDiT's modules: ours (Stability's, in joint_blocks.{i}) -> diffusers' (in
# transformer_blocks.{i}); several where diffusers splits what Stability fuses (q, k, v).
MMDIT_BLOCK_NAMES = {
    "x_block.attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "x_block.attn.proj": ("attn.to_out.0",),
    "x_block.attn.ln_q": ("attn.norm_q",),
    "x_block.attn.ln_k": ("attn.norm_k",),
    "context_block.attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "context_block.attn.proj": ("attn.to_add_out",),
    "context_block.attn.ln_q": ("attn.norm_added_q",),
    "context_block.attn.ln_k": ("attn.norm_added_k",),
    "x_block.attn2.qkv": ("attn2.to_q", "attn2.to_k", "attn2.to_v"),
    "x_block.attn2.proj": ("attn2.to_out.0",),
    "x_block.attn2.ln_q": ("attn2.norm_q",),
    "x_block.attn2.ln_k": ("attn2.norm_k",),
    "x_block.mlp.fc1": ("ff.net.0.proj",),
    "x_block.mlp.fc2": ("ff.net.2",),
    "context_block.mlp.fc1": ("ff_context.net.0.proj",),
    "context_block.mlp.fc2": ("ff_context.net.2",),
    "x_block.adaLN_modulation.1": ("norm1.linear",),
    "context_block.adaLN_modulation.1": ("norm1_context.linear",),
}
MMDIT_TOP_NAMES = {
    "x_embedder.proj": "pos_embed.proj",
    "context_embedder": "context_embedder",
    "t_embedder.mlp.0": "time_text_embed.timestep_embedder.linear_1",
    "t_embedder.mlp.2": "time_text_embed.timestep_embedder.linear_2",
    "y_embedder.mlp.0": "time_text_embed.text_embedder.linear_1",
    "y_embedder.mlp.2": "time_text_embed.text_embedder.linear_2",
    "final_layer.linear": "proj_out",
    "final_layer.adaLN_modulation.1": "norm_out.linear",
}


def mmdit_diffusers_names(
    name: str, depth: int, last_context_pre_only: bool = True
) -> tuple[tuple[str, ...], bool]:
    """Our MMDiT module's diffusers name(s), and whether its output halves are swapped there:
    diffusers orders the final adaLN modulations (scale, shift), Stability (shift, scale); that
    holds for the final layer and for the last block's (pre-only) context block (an InstantX
    ControlNet's last block is not pre-only: `last_context_pre_only=False`)."""
    swapped = name == "final_layer.adaLN_modulation.1" or (
        last_context_pre_only
        and name == f"joint_blocks.{depth - 1}.context_block.adaLN_modulation.1"
    )
    if name in MMDIT_TOP_NAMES:
        return (MMDIT_TOP_NAMES[name],), swapped
    m = re.fullmatch(r"joint_blocks\.(\d+)\.(.+)", name)
    if m is None or m[2] not in MMDIT_BLOCK_NAMES:
        raise ValueError(f"no diffusers name for MMDiT layer {name!r}")
    return tuple(f"transformer_blocks.{m[1]}.{d}" for d in MMDIT_BLOCK_NAMES[m[2]]), swapped


def swap_halves(t: Tensor) -> Tensor:
    """The two halves of dim 0 exchanged: (scale, shift) <-> (shift, scale)."""
    return torch.cat(t.chunk(2)[::-1])


def mmdit_from_diffusers(
    d: dict[str, LazyTensor], last_context_pre_only: bool = True
) -> dict[str, LazyTensor]:
    blocks = sorted({int(k.split(".")[1]) for k in d if k.startswith("transformer_blocks.")})
    depth = blocks[-1] + 1 if blocks else 0
    ours = [
        *MMDIT_TOP_NAMES,
        *(f"joint_blocks.{i}.{sub}" for i in blocks for sub in MMDIT_BLOCK_NAMES),
    ]
    renames, fused = {}, {}  # diffusers stem -> (our stem, swapped); our stem -> their stems
    for name in ours:
        theirs, swapped = mmdit_diffusers_names(name, depth, last_context_pre_only)
        if len(theirs) == 1:
            renames[theirs[0]] = (name, swapped)
        else:
            fused[name] = theirs
    split = {stem for theirs in fused.values() for stem in theirs}
    out: dict[str, LazyTensor] = {}
    for k, t in d.items():
        stem, _, param = k.rpartition(".")
        if k == "pos_embed.pos_embed":
            out["pos_embed"] = t
        elif stem in renames:
            name, swapped = renames[stem]
            out[f"{name}.{param}"] = (
                derived(t, t.shape, lambda t=t: swap_halves(t.read())) if swapped else t
            )
        elif stem not in split and k not in out:
            out[k] = t  # unknown: reported as unexpected when loading
    for name, theirs in fused.items():
        for param in ("weight", "bias"):
            keys = [f"{stem}.{param}" for stem in theirs]
            if all(key in d for key in keys):
                out[f"{name}.{param}"] = concat([d[key] for key in keys])
    return out


def controlnet_tensors(d: dict[str, LazyTensor]) -> dict[str, LazyTensor]:
    """A ControlNet's tensors (Stability's mixed naming or diffusers') in our naming: the MMDiT's
    map for the embedders and the joint blocks (InstantX); the SD3.5 kind's self-attention-only
    blocks are the MMDiT's `x_block` halves, named `transformer_blocks.N.*` as in Stability's files."""
    joint = any(".norm1_context." in k or ".attn.add_q_proj." in k for k in d)
    out = mmdit_from_diffusers(d, last_context_pre_only=False)
    if joint:
        return out
    return {
        re.sub(r"^joint_blocks\.(\d+)\.x_block\.", r"transformer_blocks.\1.", k): t
        for k, t in out.items()
    }


def open_controlnet(path: str | Path) -> Component:
    """A ControlNet from a safetensors file or a diffusers folder, every key and shape checked
    (the weights are not read). Tensors the model does not use (e.g. an unused `pos_embed.proj`)
    are dropped with a warning that names them; `control_type` is read into the component."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    files = sharded_files(path) if path.is_dir() else [path]
    raw: dict[str, LazyTensor] = {}
    metadata: dict[str, str] = {}
    for f in files:
        st = SafetensorsFile(f)
        metadata.update(st.metadata)
        raw.update((k, from_file(st, k)) for k in st.tensors)
    if kind_of_standalone({k: t.shape for k, t in raw.items()}) != "controlnet":
        raise CheckpointError(
            f"{path}: not an SD3 ControlNet (no controlnet_blocks.* tensors; first keys: {list(raw)[:3]})"
        )
    control_type = None
    if "control_type" in raw:
        t = raw.pop("control_type")
        value = t.read().flatten()
        code = int(value[0]) if value.numel() == 1 else -1
        if code not in CONTROL_TYPES:
            raise CheckpointError(
                f"{t.origin}: unknown control type {value.tolist()} (known: "
                f"{', '.join(f'{k} {v}' for k, v in CONTROL_TYPES.items())})"
            )
        control_type = CONTROL_TYPES[code]
    comp = Component("controlnet", files, controlnet_tensors(raw), metadata, control_type)
    config = infer_config(comp)
    with torch.device("meta"):
        expected = ControlNet(config).state_dict().keys()
    unused = sorted(k for k in comp.tensors if k not in expected)
    if unused:
        warnings.warn(
            f"{path}: ignoring {len(unused)} tensors the {config.kind} ControlNet does not use: {unused[:5]}",
            stacklevel=2,
        )
        for k in unused:
            del comp.tensors[k]
    check_component(comp)
    return comp


def vae_from_diffusers(d: dict[str, LazyTensor]) -> dict[str, LazyTensor]:
    n_up = len({k.split(".")[2] for k in d if k.startswith("decoder.up_blocks.")})
    rules = [
        (r"(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out."),
        (r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2."),
        (r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample."),
        (
            r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.",
            lambda m: f"decoder.up.{n_up - 1 - int(m[1])}.block.{m[2]}.",
        ),
        (
            r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
            lambda m: f"decoder.up.{n_up - 1 - int(m[1])}.upsample.",
        ),
        (
            r"(encoder|decoder)\.mid_block\.resnets\.(\d)\.",
            lambda m: f"{m[1]}.mid.block_{int(m[2]) + 1}.",
        ),
        (r"(encoder|decoder)\.mid_block\.attentions\.0\.", r"\1.mid.attn_1."),
        (r"\.conv_shortcut\.", ".nin_shortcut."),
        (r"attn_1\.group_norm\.", "attn_1.norm."),
        (r"attn_1\.to_(q|k|v)\.", r"attn_1.\1."),
        (r"attn_1\.to_out\.0\.", "attn_1.proj_out."),
    ]
    out = {}
    for k, t in d.items():
        new = k
        for pattern, repl in rules:
            new = re.sub(pattern, repl, new)
        if re.search(r"attn_1\.(q|k|v|proj_out)\.weight$", new) and len(t.shape) == 2:
            t = reshaped(t, (*t.shape, 1, 1))  # diffusers uses linear layers, Stability 1x1 convs
        out[new] = t
    return out


# ---------------------------------------------------------------------------------------------
# Building modules


def _config(component: Component):
    shapes = component.shapes
    if (
        component.name == "t5xxl"
        and "encoder.embed_tokens.weight" not in shapes
        and "shared.weight" in shapes
    ):
        component.tensors["encoder.embed_tokens.weight"] = component.tensors[
            "shared.weight"
        ]  # tied
        shapes = component.shapes
    if component.name == "mmdit":
        return MMDiTConfig.from_shapes(shapes)
    if component.name == "controlnet":
        return ControlNetConfig.from_shapes(shapes)
    if component.name == "vae":
        return VAEConfig.from_shapes(shapes)
    if component.name == "clip_l":
        return CLIPConfig.from_shapes(shapes, hidden_act="quick_gelu", project_pooled=False)
    if component.name == "clip_g":
        return CLIPConfig.from_shapes(shapes, hidden_act="gelu", project_pooled=True)
    return T5Config.from_shapes(shapes)


MODULES: dict[str, type[nn.Module]] = {
    "mmdit": MMDiT,
    "vae": AutoEncoder,
    "clip_l": CLIPTextModel,
    "clip_g": CLIPTextModel,
    "t5xxl": T5Encoder,
    "controlnet": ControlNet,
}


def infer_config(component: Component):
    try:
        return _config(component)
    except (ValueError, KeyError, IndexError) as e:
        msg = e if isinstance(e, ValueError) else f"tensor {e} is missing"
        raise CheckpointError(
            f"{component.where()}: the {component.name} tensors do not fit: {msg}"
        ) from None


def check_component(component: Component) -> nn.Module:
    """The module for `component` on the meta device, after checking that its tensors are exactly
    the module's keys with the module's shapes (no weight is read)."""
    config = infer_config(component)
    with torch.device("meta"):
        module = MODULES[component.name](config)
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    got = {
        k: t for k, t in component.tensors.items() if k in expected or not HARMLESS_EXTRAS.search(k)
    }
    missing = sorted(expected.keys() - got.keys())
    unexpected = sorted(got.keys() - expected.keys())
    where = component.where()
    if missing:
        raise CheckpointError(
            f"{where}: {component.name} is missing {len(missing)} tensors, e.g. {missing[:5]}"
        )
    if unexpected:
        raise CheckpointError(
            f"{where}: {component.name} has {len(unexpected)} unexpected tensors, e.g. {unexpected[:5]}"
        )
    for k, shape in expected.items():
        if got[k].shape != shape:
            raise CheckpointError(
                f"{got[k].origin}: wrong shape {list(got[k].shape)}, expected {list(shape)} "
                f"for the {component.name} its other tensors describe"
            )
    return module


def load_component(
    component: Component,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    int8: bool = False,
    edits: Mapping[str, Callable[[Tensor], Tensor]] | None = None,
    int4: bool = False,
) -> nn.Module:
    """Build the module for `component` from its tensors, checking every key and shape first.
    `int8`: the MMDiT's or T5's block linears are quantized as they load (`kernels.quantization`),
    one tensor at a time, so their full-precision weights are never all in memory; an fp32 MMDiT
    on a CPU then multiplies in int8. `int4`: the same layers in 4 bits (a GGUF file's Q4_0
    weights taken as they are stored). `edits`: {key: tensor as stored -> tensor to use}, applied
    as each tensor is read, before it is converted or quantized (merged LoRAs, `sd3.loras`)."""
    if int8 and int4:
        raise ValueError("int8 and int4 exclude each other: choose one")
    module = check_component(component)
    if int8:
        quantized = set(use_int8(module, component.name))
    elif int4:
        try:
            quantized = set(use_int4(module, component.name))
        except ValueError as e:
            raise CheckpointError(f"{component.where()}: {e}") from None
    else:
        quantized = set()
    expected = module.state_dict()
    got = component.tensors
    state = {}
    for k in expected:  # one tensor at a time, so a conversion never holds two copies of all
        layer, _, leaf = k.rpartition(".")
        if layer in quantized and leaf == SCALE:
            continue  # made with its weight
        t = got[k]
        edit = edits.get(k) if edits else None
        if layer in quantized and leaf == "weight":
            if int4 and edit is None and t.quant == "Q4_0" and t.blocks is not None:
                state[k], state[f"{layer}.{SCALE}"] = q4_0_as_int4(t.blocks(), device)
            else:
                source = t.read() if edit is None else edit(t.read())
                quantize = quantize_int4 if int4 else quantize_weight
                state[k], state[f"{layer}.{SCALE}"] = quantize(source.to(device))
            t.release()
            continue
        if edit is None and t.read_as is not None:  # GGUF blocks: dequantized into `dtype`
            state[k] = t.read_in(dtype).to(device)
            t.release()
            continue
        source = t.read() if edit is None else edit(t.read())
        state[k] = source.to(device=device, dtype=dtype)
        if not (t.mapped and state[k] is source):  # converted: the file pages are done with
            t.release()
    module.load_state_dict(state, assign=True)
    del state  # the module holds the weights alone, so packing frees each int8 weight in turn
    if int8:
        pack_for_int8_gemm(module, component.name, dtype, device)
    return module.eval().requires_grad_(False)


def q4_0_as_int4(blocks: Tensor, device: str | torch.device) -> tuple[Tensor, Tensor]:
    """GGUF Q4_0 blocks [out, in / 32 * 18 bytes] -> `Int4Linear`'s (packed weight, scale):
    the same numbers, split into the 16 bytes of nibbles and the fp16 scale of each block."""
    rows = blocks.shape[0]
    b = blocks.reshape(rows, -1, 18)
    scale = b[:, :, :2].contiguous().view(torch.float16).reshape(rows, -1)
    return b[:, :, 2:].reshape(rows, -1).to(device, copy=True), scale.to(device)
