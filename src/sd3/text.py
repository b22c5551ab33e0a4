"""Text conditioning of SD3 / SD3.5: prompt -> (context, pooled).

SD3 (Esser et al. 2024, "Scaling Rectified Flow Transformers for High-Resolution Image
Synthesis", fig. 2) conditions the MM-DiT on three frozen text encoders:

- CLIP-L and CLIP-G each give their penultimate hidden states [B, 77, 768 | 1280] and a pooled
  vector (CLIP-L's unprojected, CLIP-G's projected);
- T5-XXL gives its final hidden states [B, T, 4096].

context = [zero-pad(CLIP-L ‖ CLIP-G, channels) to 4096 ; T5] along the sequence: [B, 77 + T, 4096].
(A model may read fewer than 77 CLIP positions, `clip_length`: CLIP's attention is causal, so the
first positions are the same whatever follows. The bundled shapes model reads 24.)
pooled  = CLIP-L pooled ‖ CLIP-G pooled: [B, 2048], added to the timestep embedding.

Tokenization follows Stability's reference (`sd3_impls`): CLIP takes BOS + at most 75 tokens +
EOS, padded to 77, CLIP-L with EOS and CLIP-G with id 0 ("!"; a "!" typed in a prompt stays
ordinary text, unlike in diffusers, whose pad_token="!" makes it id 0 too); T5 ends with EOS (1)
and pads with 0. The vocabularies ship in `assets/tokenizers` (see its PROVENANCE.md);
a diffusers folder's own tokenizer files are used instead when given.
"""

import gzip
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import BPE
from torch import Tensor, nn

from sd3.models.clip import CLIPTextModel
from sd3.models.t5 import T5Encoder

BUNDLED = Path(__file__).parent / "assets" / "tokenizers"
CLIP_LENGTH = 77  # CLIP's position table; SD3 always uses all 77 positions
T5_MIN_LENGTH = 77  # T5 context is padded to at least this many tokens ...
T5_MAX_LENGTH = 256  # ... and cut at this many (diffusers' default max_sequence_length)
CLIP_L_PAD = 49407  # <|endoftext|>
CLIP_G_PAD = 0  # "!", as OpenCLIP pads

# CLIP's pre-tokenization (OpenAI `simple_tokenizer.py`): words, single digits, punctuation runs
CLIP_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def _read(folder: Path, name: str) -> str:
    """Text of `folder/name`, or of `folder/name.gz` (how the bundled files are stored)."""
    if (folder / name).is_file():
        return (folder / name).read_text(encoding="utf-8")
    if (folder / f"{name}.gz").is_file():
        return gzip.decompress((folder / f"{name}.gz").read_bytes()).decode("utf-8")
    raise FileNotFoundError(f"no {name} (or {name}.gz) in {folder}")


class CLIPTokenizer:
    """CLIP's byte-level BPE: prompts -> ids [B, 77] = BOS, up to 75 tokens, EOS, padding."""

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], pad_id: int):
        if not 0 <= pad_id < len(vocab):
            raise ValueError(f"pad_id {pad_id} is outside the vocabulary of {len(vocab)} tokens")
        bpe = BPE(
            vocab, merges, continuing_subword_prefix="", end_of_word_suffix="</w>",
            unk_token="<|endoftext|>", fuse_unk=False,
        )  # fmt: skip
        self.tokenizer = Tokenizer(bpe)
        # CLIP lowercases and collapses whitespace; NFC stands in for ftfy's normalisation
        self.tokenizer.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
        )
        self.tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(CLIP_PATTERN), behavior="removed", invert=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False),
            ]
        )
        self.tokenizer.add_special_tokens(["<|startoftext|>", "<|endoftext|>"])
        self.bos, self.eos = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
        self.pad = pad_id

    @classmethod
    def from_folder(cls, folder: str | Path, pad_id: int) -> "CLIPTokenizer":
        """From a diffusers `tokenizer/` or `tokenizer_2/` folder (vocab.json + merges.txt)."""
        folder = Path(folder)
        vocab = json.loads(_read(folder, "vocab.json"))
        lines = _read(folder, "merges.txt").splitlines()
        merges = [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
        return cls(vocab, merges, pad_id)

    @classmethod
    def default(cls, pad_id: int) -> "CLIPTokenizer":
        return cls.from_folder(BUNDLED / "clip", pad_id)

    def __call__(self, prompts: list[str]) -> Tensor:
        ids = torch.full((len(prompts), CLIP_LENGTH), self.pad, dtype=torch.long)
        room = CLIP_LENGTH - 2
        for i, enc in enumerate(self.tokenizer.encode_batch(prompts, add_special_tokens=False)):
            tokens = enc.ids
            if len(tokens) > room:
                warnings.warn(
                    f"CLIP reads {room} tokens: dropped the last {len(tokens) - room} of "
                    f"{len(tokens)} tokens of prompt {i} ({prompts[i][:40]!r}...)",
                    stacklevel=2,
                )
            row = [self.bos, *tokens[:room], self.eos]
            ids[i, : len(row)] = torch.tensor(row)
        return ids


class T5Tokenizer:
    """T5 v1.1's Unigram (SentencePiece) model: prompts -> ids [B, T], EOS-terminated, 0-padded.

    By default T is the longest prompt's length, at least 77 and at most 256 (longer prompts are
    cut with a warning); a fixed `length` pads or cuts to exactly that, like diffusers'
    `max_sequence_length`.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        self.eos, self.pad = tokenizer.token_to_id("</s>"), tokenizer.token_to_id("<pad>")
        if self.eos is None or self.pad is None:
            raise ValueError("not a T5 tokenizer: '</s>' or '<pad>' is missing from its vocabulary")

    @classmethod
    def from_folder(cls, folder: str | Path) -> "T5Tokenizer":
        """From a diffusers `tokenizer_3/` folder: its tokenizer.json (`tokenizers` format)."""
        folder = Path(folder)
        if not (folder / "tokenizer.json").is_file() and (folder / "spiece.model").is_file():
            raise ValueError(
                f"{folder} has spiece.model but no tokenizer.json, and reading a SentencePiece "
                "model needs sentencepiece/transformers. Convert it once with "
                "`transformers.T5TokenizerFast.from_pretrained(folder).save_pretrained(folder)`, "
                "or leave it out to use the bundled T5 v1.1 tokenizer."
            )
        return cls(Tokenizer.from_str(_read(folder, "tokenizer.json")))

    @classmethod
    def default(cls) -> "T5Tokenizer":
        return cls.from_folder(BUNDLED / "t5")

    def _encode(self, prompts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(prompts, add_special_tokens=False)]

    def length(self, prompts: list[str], length: int | None = None) -> int:
        """T, the number of positions `__call__` gives these prompts."""
        return self._length(self._encode(prompts), length)

    @staticmethod
    def _length(encoded: list[list[int]], length: int | None) -> int:
        if length is not None:
            return length
        longest = max((len(tokens) + 1 for tokens in encoded), default=0)
        return max(T5_MIN_LENGTH, min(longest, T5_MAX_LENGTH))

    def __call__(self, prompts: list[str], length: int | None = None) -> Tensor:
        encoded = self._encode(prompts)
        if length is None:
            length = self._length(encoded, None)
        elif length < 1:
            raise ValueError(f"T5 length must be at least 1 (room for EOS), got {length}")
        ids = torch.full((len(prompts), length), self.pad, dtype=torch.long)
        for i, tokens in enumerate(encoded):
            if len(tokens) > length - 1:
                warnings.warn(
                    f"T5 reads {length - 1} tokens here: dropped the last {len(tokens) - length + 1} "
                    f"of {len(tokens)} tokens of prompt {i} ({prompts[i][:40]!r}...)",
                    stacklevel=2,
                )
            row = [*tokens[: length - 1], self.eos]
            ids[i, : len(row)] = torch.tensor(row)
        return ids


@dataclass
class Tokenizers:
    clip_l: CLIPTokenizer
    clip_g: CLIPTokenizer
    t5: T5Tokenizer

    @classmethod
    def default(cls) -> "Tokenizers":
        """The bundled vocabularies (CLIP BPE, T5 v1.1), as in every official SD3/SD3.5 model."""
        return cls(
            CLIPTokenizer.default(CLIP_L_PAD),
            CLIPTokenizer.default(CLIP_G_PAD),
            T5Tokenizer.default(),
        )

    @classmethod
    def from_folder(cls, root: str | Path) -> "Tokenizers":
        """From a diffusers model folder: `tokenizer/`, `tokenizer_2/`, `tokenizer_3/`, each
        falling back to the bundled files when the folder lacks it."""
        root = Path(root)

        def clip(name: str, pad_id: int) -> CLIPTokenizer:
            folder = root / name
            if folder.is_dir():
                return CLIPTokenizer.from_folder(folder, pad_id)
            return CLIPTokenizer.default(pad_id)

        t5 = root / "tokenizer_3"
        return cls(
            clip("tokenizer", CLIP_L_PAD),
            clip("tokenizer_2", CLIP_G_PAD),
            T5Tokenizer.from_folder(t5) if t5.is_dir() else T5Tokenizer.default(),
        )


class TextEncoders(nn.Module):
    """The three SD3 text encoders and their fusion into (context, pooled).

    `context_width` is the MM-DiT's context width (`context_embedder.weight.shape[1]`, 4096 in the
    official models); it defaults to max(CLIP-L + CLIP-G width, T5 width). Without T5 its
    part of the context is zeros, as in SD3's T5-free mode. `t5_length` fixes the T5 length
    (see `T5Tokenizer`); `clip_length` is how many of CLIP's 77 positions enter the context (77 in
    the official models). Outputs take the dtype and device of CLIP-L. The encoders stay frozen
    (in SD3 training too), so `encode` runs without autograd.
    """

    def __init__(
        self,
        clip_l: CLIPTextModel,
        clip_g: CLIPTextModel,
        t5: T5Encoder | None = None,
        tokenizers: Tokenizers | None = None,
        context_width: int | None = None,
        t5_length: int | None = None,
        clip_length: int = CLIP_LENGTH,
    ):
        super().__init__()
        self.clip_l, self.clip_g, self.t5 = clip_l, clip_g, t5
        self.tokenizers = tokenizers or Tokenizers.default()
        clip_width = clip_l.config.width + clip_g.config.width
        t5_width = t5.config.d_model if t5 is not None else 0
        self.context_width = max(clip_width, t5_width) if context_width is None else context_width
        if self.context_width < max(clip_width, t5_width):
            raise ValueError(
                f"context_width {self.context_width} is narrower than CLIP-L + CLIP-G "
                f"({clip_width}) or T5 ({t5_width})"
            )
        if t5_length is not None and t5_length < 1:
            raise ValueError(f"t5_length must be at least 1, got {t5_length}")
        self.t5_length = t5_length
        if not 2 <= clip_length <= CLIP_LENGTH:
            raise ValueError(f"clip_length must be in [2, {CLIP_LENGTH}], got {clip_length}")
        self.clip_length = clip_length

    @torch.no_grad()
    def encode(self, prompts: list[str] | str) -> tuple[Tensor, Tensor]:
        """prompts -> (context [B, 77 + T, context_width], pooled [B, CLIP-L + CLIP-G width]).

        Encode a prompt and its negative prompt in one call so their T5 lengths agree.
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError("encode needs at least one prompt")
        tok = self.tokenizers
        t5_ids = None if self.t5 is None else tok.t5(prompts, self.t5_length)
        t5_length = t5_ids.shape[1] if t5_ids is not None else self.t5_length or T5_MIN_LENGTH
        return self.embed(tok.clip_l(prompts), tok.clip_g(prompts), t5_ids, t5_length, prompts)

    def embed(
        self,
        l_ids: Tensor,
        g_ids: Tensor,
        t5_ids: Tensor | None,
        t5_length: int,
        prompts: list[str] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Token ids -> (context, pooled), with autograd where it is on (training the encoders
        jointly): CLIP-L ‖ CLIP-G hidden states, zero-padded to the context width, followed by
        T5's (zeros of `t5_length` rows without T5); pooled = CLIP-L ‖ CLIP-G pooled. With
        `prompts`, warns about prompts whose end the model's CLIP positions cannot see."""
        l_hidden, l_pooled = self.clip_l(l_ids.to(_device(self.clip_l)))
        g_hidden, g_pooled = self.clip_g(g_ids.to(_device(self.clip_g)))
        clip = self.clip_context(l_hidden, g_hidden, l_ids, prompts)
        if t5_ids is None:
            t5 = clip.new_zeros(len(l_ids), t5_length, self.context_width)
        else:
            t5 = self.t5(t5_ids.to(_device(self.t5)))
        context = torch.cat([self._widen(clip), self._widen(t5.to(clip))], dim=1)
        return context, torch.cat([l_pooled, g_pooled.to(l_pooled)], dim=-1)

    def clip_context(
        self,
        l_hidden: Tensor,
        g_hidden: Tensor,
        l_ids: Tensor,
        prompts: list[str] | None = None,
    ) -> Tensor:
        """CLIP-L ‖ CLIP-G hidden states [B, clip_length, widths]; given the `prompts`, warns when
        a prompt's end (CLIP-L's first EOS) lies beyond the positions the model reads."""
        n = self.clip_length
        if prompts is not None and n < CLIP_LENGTH:
            ends = (l_ids == CLIP_L_PAD).int().argmax(dim=1)
            for i in (ends >= n).nonzero().flatten().tolist():
                warnings.warn(
                    f"this model reads {n} CLIP positions ({n - 2} tokens): the rest of prompt "
                    f"{i} ({prompts[i][:40]!r}...) reaches the context only through T5",
                    stacklevel=4,
                )
        return torch.cat([l_hidden[:, :n], g_hidden[:, :n].to(l_hidden)], dim=-1)

    def _widen(self, x: Tensor) -> Tensor:
        return F.pad(x, (0, self.context_width - x.shape[-1]))


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device
