"""GGUF checkpoints, as stable-diffusion.cpp and ComfyUI-GGUF write them, read without the gguf
package: the header parsed here, the data memory-mapped, each tensor dequantized as it loads.

A GGUF file (little-endian) is: magic "GGUF", version (2 or 3), tensor count, key-value count;
the key-values (typed metadata); one info per tensor (name, its dims in ggml order, innermost
first, so reversed against torch's, its ggml type and its offset in the data); padding to
`general.alignment` (default 32); the data. A quantized type stores each row of `dims[0]`
values as blocks of `block` values in `size` bytes; `DEQUANTIZE` holds ggml's definition of
each type (ggml-quants.c's `dequantize_row_*`), vectorised in torch with the same float32
operations in the same order, so the values equal ggml's and the gguf package's bit for bit.
"""

import math
import mmap
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
QK_K = 256  # the K-quants' super-block


class GGUFError(ValueError):
    """A GGUF file that cannot be read, with the file named in the message."""


# ---------------------------------------------------------------------------------------------
# Dequantization: blocks [n, size] uint8 -> values [n, block] float32


def _f16(b: Tensor) -> Tensor:
    """Little-endian fp16 bytes [n, 2] -> float32 [n, 1]."""
    return b.contiguous().view(torch.float16).float()


def _nibbles(qs: Tensor, groups: int) -> Tensor:
    """Bytes [n, groups * w] -> [n, groups * 2 * w]: per group of w bytes, the low nibbles, then
    the high ones."""
    n = qs.shape[0]
    qs = qs.reshape(n, groups, 1, -1)
    return torch.cat([qs & 0x0F, qs >> 4], dim=2).reshape(n, -1)


def _bits(b: Tensor, width: int, count: int) -> Tensor:
    """Bytes [n, m] -> [n, count, m]: field j is bits j*width.. of every byte."""
    shifts = torch.arange(0, width * count, width, dtype=torch.uint8)
    return (b[:, None, :] >> shifts[None, :, None]) & ((1 << width) - 1)


def _q4_0(b: Tensor) -> Tensor:
    d = _f16(b[:, :2])
    q = _nibbles(b[:, 2:], 1).to(torch.int8) - 8
    return d * q.float()


def _q4_1(b: Tensor) -> Tensor:
    d, m = _f16(b[:, :2]), _f16(b[:, 2:4])
    return d * _nibbles(b[:, 4:], 1).float() + m


def _q5(b: Tensor) -> Tensor:
    """The 5-bit values of a Q5_0 / Q5_1 block's last 20 bytes: qh (bit i: value i's fifth
    bit, as a little-endian uint32) and qs (the low nibbles, as Q4_0)."""
    qh = _bits(b[:, -20:-16], 1, 8).transpose(1, 2).reshape(b.shape[0], 32)
    return _nibbles(b[:, -16:], 1) | (qh << 4)


def _q5_0(b: Tensor) -> Tensor:
    return _f16(b[:, :2]) * (_q5(b).to(torch.int8) - 16).float()


def _q5_1(b: Tensor) -> Tensor:
    d, m = _f16(b[:, :2]), _f16(b[:, 2:4])
    return d * _q5(b).float() + m


def _q8_0(b: Tensor) -> Tensor:
    return b[:, 2:].contiguous().view(torch.int8).float() * _f16(b[:, :2])


def _q2_k(b: Tensor) -> Tensor:
    n = b.shape[0]
    scales, qs = b[:, :16], b[:, 16:80]
    d, dmin = _f16(b[:, 80:82]), _f16(b[:, 82:84])
    dl = (d * (scales & 0x0F).float()).reshape(n, 16, 1)
    ml = (dmin * (scales >> 4).float()).reshape(n, 16, 1)
    q = _bits(qs.reshape(n * 2, 32), 2, 4).reshape(n, 16, 16).float()  # 2 halves x 4 shifts
    return (dl * q - ml).reshape(n, QK_K)


def _q3_k(b: Tensor) -> Tensor:
    n = b.shape[0]
    hmask, qs, packed, d = b[:, :32], b[:, 32:96], b[:, 96:108], _f16(b[:, 108:110])
    low = _bits(packed[:, :8], 4, 2).reshape(n, 16)  # 16 scales of 6 bits: 4 low bits here,
    high = _bits(packed[:, 8:], 2, 4).reshape(n, 16)  # 2 high bits here
    scales = ((low | (high << 4)).to(torch.int8) - 32).float()
    dl = (d * scales).reshape(n, 16, 1)
    ql = _bits(qs.reshape(n * 2, 32), 2, 4).reshape(n, 16, 16)
    qh = _bits(hmask, 1, 8).reshape(n, 16, 16) ^ 1  # the high bit set means no offset of -4
    q = (ql.to(torch.int8) - (qh << 2).to(torch.int8)).float()
    return (dl * q).reshape(n, QK_K)


def _k_scales(packed: Tensor) -> tuple[Tensor, Tensor]:
    """Q4_K / Q5_K: 12 bytes -> 8 scales and 8 mins of 6 bits (ggml's get_scale_min_k4)."""
    n = packed.shape[0]
    d, m, md = packed.reshape(n, 3, 4).unbind(1)
    scale = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=1)
    low = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=1)
    return scale.float(), low.float()


def _q4_k(b: Tensor) -> Tensor:
    n = b.shape[0]
    d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
    scale, low = _k_scales(b[:, 4:16])
    dl, ml = (d * scale).reshape(n, 8, 1), (dmin * low).reshape(n, 8, 1)
    q = _nibbles(b[:, 16:], 4).reshape(n, 8, 32).float()
    return (dl * q - ml).reshape(n, QK_K)


def _q5_k(b: Tensor) -> Tensor:
    n = b.shape[0]
    d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
    scale, low = _k_scales(b[:, 4:16])
    dl, ml = (d * scale).reshape(n, 8, 1), (dmin * low).reshape(n, 8, 1)
    ql = _nibbles(b[:, 48:], 4).reshape(n, 8, 32)
    qh = _bits(b[:, 16:48], 1, 8)
    q = (ql | (qh << 4)).float()
    return (dl * q - ml).reshape(n, QK_K)


def _q6_k(b: Tensor) -> Tensor:
    n = b.shape[0]
    ql, qh, scales, d = b[:, :128], b[:, 128:192], b[:, 192:208], _f16(b[:, 208:210])
    dl = (d * scales.contiguous().view(torch.int8).float()).reshape(n, 16, 1)
    low = _nibbles(ql.reshape(n * 2, 64), 1).reshape(n, 8, 32)
    high = _bits(qh.reshape(n * 2, 32), 2, 4).reshape(n, 8, 32)
    q = ((low | (high << 4)).to(torch.int8) - 32).reshape(n, 16, 16).float()
    return (dl * q).reshape(n, QK_K)


@dataclass(frozen=True)
class GGMLType:
    name: str
    block: int  # values per block
    size: int  # bytes per block
    dequantize: Callable[[Tensor], Tensor] | None = None  # quantized types
    dtype: torch.dtype | None = None  # plain types: stored as this torch dtype


TYPES = {
    0: GGMLType("F32", 1, 4, dtype=torch.float32),
    1: GGMLType("F16", 1, 2, dtype=torch.float16),
    30: GGMLType("BF16", 1, 2, dtype=torch.bfloat16),
    2: GGMLType("Q4_0", 32, 18, _q4_0),
    3: GGMLType("Q4_1", 32, 20, _q4_1),
    6: GGMLType("Q5_0", 32, 22, _q5_0),
    7: GGMLType("Q5_1", 32, 24, _q5_1),
    8: GGMLType("Q8_0", 32, 34, _q8_0),
    10: GGMLType("Q2_K", QK_K, 84, _q2_k),
    11: GGMLType("Q3_K", QK_K, 110, _q3_k),
    12: GGMLType("Q4_K", QK_K, 144, _q4_k),
    13: GGMLType("Q5_K", QK_K, 176, _q5_k),
    14: GGMLType("Q6_K", QK_K, 210, _q6_k),
}
# ggml's other types, named in errors
OTHER_TYPES = {
    9: "Q8_1", 15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL",
    21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64",
    29: "IQ1_M", 34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4",
}  # fmt: skip
CHUNK_BLOCKS = 1 << 14  # blocks dequantized at once: small temporaries, few Python calls


# ---------------------------------------------------------------------------------------------
# The file

# metadata value types: id -> struct format (8: string, 9: array)
SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}  # fmt: skip


@dataclass(frozen=True)
class GGUFTensor:
    type: GGMLType
    shape: tuple[int, ...]  # torch order (ggml's dims reversed)
    begin: int  # bytes from the start of the data
    nbytes: int


class _Header:
    """A cursor over the header bytes; running past the end is a truncated file."""

    def __init__(self, data: mmap.mmap | bytes, path: Path):
        self.data, self.pos, self.path = data, 0, path

    def take(self, fmt: str):
        size = struct.calcsize("<" + fmt)
        if self.pos + size > len(self.data):
            raise GGUFError(f"{self.path}: truncated GGUF file: the header ends early")
        values = struct.unpack_from("<" + fmt, self.data, self.pos)
        self.pos += size
        return values[0] if len(values) == 1 else values

    def string(self) -> str:
        n = self.take("Q")
        if self.pos + n > len(self.data):
            raise GGUFError(f"{self.path}: truncated GGUF file: the header ends early")
        raw = bytes(self.data[self.pos : self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise GGUFError(f"{self.path}: corrupt GGUF header (a name is not UTF-8)") from None

    def value(self, kind: int):
        if kind in SCALARS:
            return self.take(SCALARS[kind])
        if kind == 8:
            return self.string()
        if kind == 9:
            item, n = self.take("I"), self.take("Q")
            if n > len(self.data):
                raise GGUFError(f"{self.path}: corrupt GGUF header (an array of {n} values)")
            return [self.value(item) for _ in range(n)]
        raise GGUFError(f"{self.path}: corrupt GGUF header (metadata value type {kind})")


class GGUFFile:
    """One GGUF file: header and tensor infos validated on open, data memory-mapped on demand.
    `metadata`: the key-values (arrays left out); `tensors`: name -> GGUFTensor."""

    def __init__(self, path: str | Path):
        self.path = path = Path(path)
        if not path.is_file():
            raise GGUFError(f"{path}: no such file")
        size = path.stat().st_size
        if size < 24:
            raise GGUFError(f"{path}: not a GGUF file (or truncated): {size} bytes")
        with open(path, "rb") as f:
            self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        header = _Header(self._mmap, path)
        if bytes(self._mmap[:4]) != MAGIC:
            raise GGUFError(f"{path}: not a GGUF file (no GGUF magic)")
        header.pos = 4
        version, n_tensors, n_values = header.take("IQQ")
        if version not in (2, 3):
            raise GGUFError(f"{path}: GGUF version {version} (sd3 reads versions 2 and 3)")
        if 32 * n_tensors + 12 * n_values > size:  # the least each one takes in the header
            raise GGUFError(
                f"{path}: truncated or corrupt GGUF file: the header lists {n_tensors} tensors "
                f"and {n_values} values, more than its {size} bytes hold"
            )
        values = {}
        for _ in range(n_values):
            key = header.string()
            values[key] = header.value(header.take("I"))
        self.metadata = {k: v for k, v in values.items() if not isinstance(v, list)}
        self.arrays = {k: v for k, v in values.items() if isinstance(v, list)}
        infos = [self._tensor_info(header) for _ in range(n_tensors)]
        alignment = values.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0:
            raise GGUFError(f"{path}: corrupt GGUF header (alignment {alignment!r})")
        self.data_start = -(-header.pos // alignment) * alignment
        self.tensors: dict[str, GGUFTensor] = {}
        for name, tensor in infos:
            if self.data_start + tensor.begin + tensor.nbytes > size:
                raise GGUFError(
                    f"{path}: truncated GGUF file: tensor {name!r} ends at byte "
                    f"{self.data_start + tensor.begin + tensor.nbytes}, the file has {size}"
                )
            name, shape = official(name, tensor.shape)
            self.tensors[name] = GGUFTensor(tensor.type, shape, tensor.begin, tensor.nbytes)

    def _tensor_info(self, header: _Header) -> tuple[str, GGUFTensor]:
        name = header.string()
        n_dims = header.take("I")
        if n_dims > 8:
            raise GGUFError(f"{self.path}: corrupt GGUF header (tensor {name!r}: {n_dims} dims)")
        dims = [header.take("Q") for _ in range(n_dims)]
        code, begin = header.take("IQ")
        if code not in TYPES:
            kind = OTHER_TYPES.get(code, f"unknown type {code}")
            raise GGUFError(
                f"{self.path}: tensor {name!r} is stored as {kind}, which sd3 does not read "
                f"(it reads {', '.join(t.name for t in TYPES.values())})"
            )
        t = TYPES[code]
        if dims and dims[0] % t.block:
            raise GGUFError(
                f"{self.path}: corrupt GGUF header (tensor {name!r}: rows of {dims[0]} values "
                f"in {t.name} blocks of {t.block})"
            )
        nbytes = math.prod(dims) // t.block * t.size
        return name, GGUFTensor(t, tuple(reversed(dims)), begin, nbytes)

    def raw(self, name: str) -> Tensor:
        """The stored bytes of tensor `name`: [rows, bytes per row] uint8, a view of the map."""
        t = self.tensors[name]
        rows = math.prod(t.shape[:-1]) if t.shape else 1
        if t.nbytes == 0:
            return torch.empty(rows, 0, dtype=torch.uint8)
        flat = torch.frombuffer(
            self._mmap, dtype=torch.uint8, count=t.nbytes, offset=self.data_start + t.begin
        )
        return flat.view(rows, -1)

    def get(self, name: str, dtype: torch.dtype | None = None) -> Tensor:
        """Tensor `name`: a plain type as a view of the map when `dtype` is None or its own;
        else dequantized (float32, as ggml defines it) block by block into a new `dtype` tensor."""
        t = self.tensors[name]
        raw = self.raw(name)
        if t.type.dtype is not None:
            stored = raw.view(t.type.dtype).view(t.shape)
            return stored if dtype in (None, t.type.dtype) else stored.to(dtype)
        blocks = raw.reshape(-1, t.type.size)
        out = torch.empty(blocks.shape[0], t.type.block, dtype=dtype or torch.float32)
        for start in range(0, blocks.shape[0], CHUNK_BLOCKS):
            chunk = blocks[start : start + CHUNK_BLOCKS]
            out[start : start + CHUNK_BLOCKS] = t.type.dequantize(chunk)
        return out.view(t.shape)

    def release(self, name: str) -> None:
        """Drop the pages of tensor `name` from this process's memory (see SafetensorsFile)."""
        if not hasattr(mmap, "MADV_DONTNEED"):
            return
        t = self.tensors[name]
        page = mmap.PAGESIZE
        start = -(-(self.data_start + t.begin) // page) * page
        end = (self.data_start + t.begin + t.nbytes) // page * page
        if end > start:
            self._mmap.madvise(mmap.MADV_DONTNEED, start, end - start)


# stable-diffusion.cpp's converter writes CLIP's text projection under its own name (same values,
# same layout) and pos_embed [1, N, D] without its leading 1; undone as a file opens
STABLE_DIFFUSION_CPP_NAMES = {
    "transformer.text_model.text_projection": "transformer.text_projection.weight",
}


def official(name: str, shape: tuple[int, ...]) -> tuple[str, tuple[int, ...]]:
    """A tensor's official name and shape where stable-diffusion.cpp's converter departs from
    them (others unchanged)."""
    for theirs, ours in STABLE_DIFFUSION_CPP_NAMES.items():
        if name.endswith(theirs):
            name = name[: -len(theirs)] + ours
    if name.endswith("pos_embed") and len(shape) == 2:
        shape = (1, *shape)
    return name, shape


def is_gguf(path: str | Path) -> bool:
    """Whether `path` starts with the GGUF magic."""
    with open(path, "rb") as f:
        return f.read(4) == MAGIC


# llama.cpp's T5 encoder names (ComfyUI-GGUF's and city96's T5-XXL files) -> transformers'
T5_NAMES = {
    "enc.blk.": "encoder.block.",
    "token_embd.": "shared.",
    "enc.output_norm.": "encoder.final_layer_norm.",
    "attn_norm.": "layer.0.layer_norm.",
    "attn_q.": "layer.0.SelfAttention.q.",
    "attn_k.": "layer.0.SelfAttention.k.",
    "attn_v.": "layer.0.SelfAttention.v.",
    "attn_o.": "layer.0.SelfAttention.o.",
    "attn_rel_b.": "layer.0.SelfAttention.relative_attention_bias.",
    "ffn_norm.": "layer.1.layer_norm.",
    "ffn_gate.": "layer.1.DenseReluDense.wi_0.",
    "ffn_up.": "layer.1.DenseReluDense.wi_1.",
    "ffn_down.": "layer.1.DenseReluDense.wo.",
}


def transformers_name(name: str) -> str:
    """A llama.cpp T5 tensor name in transformers' naming (others unchanged)."""
    for theirs, ours in T5_NAMES.items():
        name = name.replace(theirs, ours)
    return name
