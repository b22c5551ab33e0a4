"""Text conditioning during training: per-caption embedding cache and per-encoder dropout.

SD3 (Esser et al. 2024, section 5.1) drops each of its three text encoders independently during
training, which both trains the unconditional branch used by classifier-free guidance and makes
T5 optional at inference. A dropped encoder here sees the empty prompt "" instead of the caption:
its part of (context, pooled) becomes exactly what `TextEncoders.encode("")` gives for that encoder.
With all three dropped the input is `encode("")`, which is the negative prompt the sampler uses for
CFG by default; zeros (the other common choice) would leave that input untrained, since CLIP and
T5 embed "" (BOS/EOS and padding tokens) as non-zero vectors. Without a T5 model, its part is zeros
both here and at sampling time, as in SD3's T5-free mode.
"""

import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from sd3.text import T5_MIN_LENGTH, TextEncoders

CLIP_L, CLIP_G, T5 = 0, 1, 2  # columns of the `keep` masks [B, 3]


def t5_length_for(encoders: TextEncoders, captions: list[str]) -> int:
    """One T5 length for all captions (at least 77, as at sampling), so cached rows stack."""
    if encoders.t5_length is not None:
        return encoders.t5_length
    return encoders.tokenizers.t5(captions).shape[1] if captions else T5_MIN_LENGTH


def truncation_report(encoders: TextEncoders, captions: list[str], t5_length: int) -> str | None:
    """A one-line summary of the captions CLIP (75 tokens) or T5 (t5_length - 1) will cut."""
    tok, unique = encoders.tokenizers, sorted(set(captions))

    def lengths(tokenizer) -> list[int]:
        return [len(e.ids) for e in tokenizer.encode_batch(unique, add_special_tokens=False)]

    notes = []
    clip, room = lengths(tok.clip_l.tokenizer), encoders.clip_length - 2
    if sum(n > room for n in clip):
        notes.append(
            f"CLIP keeps {room} tokens: {sum(n > room for n in clip)} of "
            f"{len(unique)} distinct captions are cut (longest {max(clip)})"
        )
    if encoders.t5 is not None:
        t5 = lengths(tok.t5.tokenizer)
        if sum(n > t5_length - 1 for n in t5):
            notes.append(
                f"T5 keeps {t5_length - 1} tokens: {sum(n > t5_length - 1 for n in t5)} of "
                f"{len(unique)} distinct captions are cut (longest {max(t5)})"
            )
    return "; ".join(notes) or None


def tokenize(
    encoders: TextEncoders, prompts: list[str], t5_length: int, keep: Tensor | None = None
) -> dict[str, Tensor]:
    """The token ids `embed` takes, where encoder e sees "" for the samples with keep[i, e]
    False (no T5 ids without a T5 model)."""

    def prompts_for(e: int) -> list[str]:
        return [p if keep is None or keep[i, e] else "" for i, p in enumerate(prompts)]

    tok = encoders.tokenizers
    with warnings.catch_warnings():  # cut captions are reported once, by `truncation_report`
        warnings.simplefilter("ignore")
        ids = {"l_ids": tok.clip_l(prompts_for(CLIP_L)), "g_ids": tok.clip_g(prompts_for(CLIP_G))}
        if encoders.t5 is not None:
            ids["t5_ids"] = tok.t5(prompts_for(T5), t5_length)
    return ids


def embed(
    encoders: TextEncoders, l_ids: Tensor, g_ids: Tensor, t5_ids: Tensor | None, t5_length: int
) -> tuple[Tensor, Tensor]:
    """`TextEncoders.embed` without prompt warnings (cut captions are reported once, by
    `truncation_report`); free of Python strings, so it compiles as one graph."""
    return encoders.embed(l_ids, g_ids, t5_ids, t5_length)


def encode_text(
    encoders: TextEncoders, prompts: list[str], t5_length: int, keep: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """(context, pooled) as `TextEncoders.encode` makes them, with autograd, where encoder e sees
    "" for the samples with keep[i, e] False."""
    ids = tokenize(encoders, prompts, t5_length, keep)
    return embed(encoders, ids["l_ids"], ids["g_ids"], ids.get("t5_ids"), t5_length)


class TextCache:
    """(context, pooled) of every distinct caption, computed once with the frozen encoders, plus
    the empty prompt's, from which `get` builds a batch with per-encoder dropout."""

    def __init__(
        self,
        encoders: TextEncoders,
        captions: list[str],
        batch_size: int = 32,
        progress: Callable[[int], None] | None = None,
    ):
        self.t5_length = t5_length_for(encoders, captions)
        self.clip_length = encoders.clip_length
        self.clip_widths = (encoders.clip_l.config.width, encoders.clip_g.config.width)
        unique = sorted(set(captions))
        self.row = {caption: i for i, caption in enumerate(unique)}
        contexts, pooled = [], []
        with torch.no_grad():
            for start in range(0, len(unique), batch_size):
                c, p = encode_text(encoders, unique[start : start + batch_size], self.t5_length)
                contexts.append(c.float().cpu())
                pooled.append(p.float().cpu())
                if progress is not None:
                    progress(len(c))
            self.context, self.pooled = torch.cat(contexts), torch.cat(pooled)
            empty_context, empty_pooled = encode_text(encoders, [""], self.t5_length)
        self.empty_context = empty_context.float().cpu()
        self.empty_pooled = empty_pooled.float().cpu()

    def rows(self, captions: list[str]) -> Tensor:
        return torch.tensor([self.row[c] for c in captions], dtype=torch.long)

    def get(self, rows: Tensor, keep: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The cached (context, pooled) of `rows`, encoder e replaced by the empty prompt's part
        where keep[i, e] is False."""
        context, pooled = self.context[rows], self.pooled[rows]  # copies: safe to write into
        if keep is None:
            return context, pooled
        wl, wg = self.clip_widths
        clip_rows = slice(None, self.clip_length)
        parts = {  # encoder: (its context rows, its context channels, its pooled channels)
            CLIP_L: (clip_rows, slice(None, wl), slice(None, wl)),
            CLIP_G: (clip_rows, slice(wl, wl + wg), slice(wl, None)),
            T5: (slice(self.clip_length, None), slice(None), None),
        }
        for e, (tokens, channels, pooled_channels) in parts.items():
            part = (slice(None), tokens, channels)
            context[part] = torch.where(
                keep[:, e, None, None], context[part], self.empty_context[part]
            )
            if pooled_channels is not None:
                p = (slice(None), pooled_channels)
                pooled[p] = torch.where(keep[:, e, None], pooled[p], self.empty_pooled[p])
        return context, pooled
