"""Tokenizers and the three-encoder conditioning (sd3.text) against known ids, transformers'
tokenizers, OpenAI's BPE algorithm, and diffusers' StableDiffusion3Pipeline.encode_prompt."""

import copy
import gzip
import json
import re
import shutil
import unicodedata
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import regex
import torch
from helpers import max_rel_err

from sd3.models.clip import CLIPConfig, CLIPTextModel
from sd3.models.t5 import T5Config, T5Encoder
from sd3.text import (
    BUNDLED,
    CLIP_G_PAD,
    CLIP_L_PAD,
    CLIPTokenizer,
    T5Tokenizer,
    TextEncoders,
    Tokenizers,
)

CAT_CLIP = [49406, 320, 1125, 539, 320, 2368, 49407]
CAT_T5 = [3, 9, 1202, 13, 3, 9, 1712, 1]

LONG_CLIP = ", ".join(f"detail number {i}" for i in range(40))  # ~160 CLIP tokens
LONG_T5 = " ".join(
    ["an extremely detailed oil painting of a quiet harbour"] * 40
)  # > 256 T5 tokens
PROMPTS = [
    "a photo of a cat",
    "A PHOTO OF A CAT",
    "  leading and   trailing   spaces  ",
    "tabs\tand\nnewlines\r\nhere",
    "It's a dog's life, isn't it? We'll see; they'd've known, I'm sure you're right.",
    "3.14159 apples, 42 pears & 1,000,000 grapes",
    "year 2024: 4k, 8K, 1080p, f/1.8, 35mm, ISO-100",
    "email@example.com https://example.org/path?q=1#frag",
    "snake_case camelCase kebab-case PascalCase",
    "((masterpiece)), [best quality], {highly detailed}, <lora:foo:0.8>",
    "!!!???...---***",
    "café naïve résumé Ångström",
    "e\u0301cole, combining accents",
    "Straße Ærøskøbing İstanbul",
    "東京の夜景、高層ビル",
    "一只猫坐在窗台上",
    "Москва зимой, снег",
    "Αθήνα το καλοκαίρι",
    "مرحبا بالعالم",
    "a cat 🐱 with a hat 🎩 and a 👨‍👩‍👧 family",
    "ＦＵＬＬＷＩＤＴＨ ｔｅｘｔ １２３",
    "x",
    "",
    "\u00a0non-breaking\u00a0space and zero\u200bwidth",
    "quotes \"double\" and 'single' and “curly” ‘ones’",
    "C++ & C# <> {} | \\ ~ ` ^ % $",
    "UPPER lower MiXeD",
    "numbers like 123456789 and 1st 2nd 3rd",
    LONG_CLIP,
    LONG_T5,
]


@pytest.fixture(scope="module")
def plain_files(tmp_path_factory) -> Path:
    """The bundled tokenizer files, decompressed, in a diffusers-style folder."""
    root = tmp_path_factory.mktemp("sd3_tokenizers")
    for sub, names in [
        ("tokenizer", ["vocab.json", "merges.txt"]),
        ("tokenizer_3", ["tokenizer.json"]),
    ]:
        (root / sub).mkdir()
        src = BUNDLED / ("clip" if sub == "tokenizer" else "t5")
        for name in names:
            (root / sub / name).write_bytes(gzip.decompress((src / f"{name}.gz").read_bytes()))
    shutil.copytree(root / "tokenizer", root / "tokenizer_2")
    return root


@pytest.fixture(scope="module")
def tokenizers() -> Tokenizers:
    return Tokenizers.default()


def quiet(fn, *args):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args)


# ---- tokenizers: known ids -----------------------------------------------------------------------


def test_known_ids(tokenizers):
    clip_l, clip_g = (
        tokenizers.clip_l(["a photo of a cat"]),
        tokenizers.clip_g(["a photo of a cat"]),
    )
    assert clip_l.shape == clip_g.shape == (1, 77)
    assert clip_l[0].tolist() == CAT_CLIP + [49407] * 70
    assert clip_g[0].tolist() == CAT_CLIP + [0] * 70
    t5 = tokenizers.t5(["a photo of a cat"])
    assert t5[0].tolist() == CAT_T5 + [0] * 69
    assert tokenizers.t5(["a photo of a cat"], 10)[0].tolist() == CAT_T5 + [0, 0]
    assert tokenizers.clip_l([""])[0, :3].tolist() == [49406, 49407, 49407]
    assert tokenizers.t5([""])[0, :2].tolist() == [1, 0]


# ---- tokenizers: against transformers and OpenAI's reference BPE ---------------------------------


def test_clip_matches_transformers(tokenizers, plain_files):
    from transformers import CLIPTokenizer as HFCLIPTokenizer

    hf = HFCLIPTokenizer.from_pretrained(plain_files / "tokenizer", model_max_length=77)
    ref = hf(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    ref = ref.input_ids
    with pytest.warns(UserWarning, match="dropped"):
        ids_l, ids_g = tokenizers.clip_l(PROMPTS), tokenizers.clip_g(PROMPTS)
    # CLIP-G: the same tokens, padded with 0 after the first EOS. (Stability's reference and
    # OpenCLIP pad this way; diffusers' pad_token="!" also turns a "!" typed in a prompt into 0.)
    after_eos = torch.arange(77) > (ref == 49407).int().argmax(1, keepdim=True)
    ref_g = ref.masked_fill(after_eos, CLIP_G_PAD)
    for i, prompt in enumerate(PROMPTS):
        assert ids_l[i].tolist() == ref[i].tolist(), prompt
        assert ids_g[i].tolist() == ref_g[i].tolist(), prompt
    assert ids_g[PROMPTS.index("!!!???...---***"), 1] != 0


def bytes_to_unicode() -> dict[int, str]:
    bs = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = [b for b in range(256) if b not in bs]
    return dict(zip(bs + extra, map(chr, bs + [256 + n for n in range(len(extra))]), strict=True))


def openai_clip_tokens(text: str, vocab: dict[str, int], ranks: dict[tuple[str, str], int]):
    """OpenAI CLIP's `simple_tokenizer.py` encode (with NFC in place of ftfy): an independent BPE."""
    pattern = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
    byte_encoder = bytes_to_unicode()
    text = re.sub(r"\s+", " ", unicodedata.normalize("NFC", text)).strip().lower()
    ids = []
    for token in regex.findall(pattern, text, regex.IGNORECASE):
        token = "".join(byte_encoder[b] for b in token.encode("utf-8"))
        word = (*token[:-1], token[-1] + "</w>")
        while len(word) > 1:
            best = min(zip(word, word[1:], strict=False), key=lambda p: ranks.get(p, float("inf")))
            if best not in ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if word[i : i + 2] == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
        ids += [vocab[t] for t in word]
    return ids


def test_clip_matches_openai_bpe(tokenizers, plain_files):
    vocab = json.loads((plain_files / "tokenizer" / "vocab.json").read_text())
    lines = (plain_files / "tokenizer" / "merges.txt").read_text().splitlines()[1:]
    ranks = {tuple(line.split()): i for i, line in enumerate(lines)}
    ids = quiet(tokenizers.clip_l, PROMPTS)
    for i, prompt in enumerate(PROMPTS):
        ref = [49406, *openai_clip_tokens(prompt, vocab, ranks)[:75], 49407]
        assert ids[i, : len(ref)].tolist() == ref, prompt
        assert (ids[i, len(ref) :] == 49407).all()


def test_t5_matches_transformers(tokenizers, plain_files):
    from transformers import T5TokenizerFast

    hf = T5TokenizerFast(tokenizer_file=str(plain_files / "tokenizer_3" / "tokenizer.json"))
    for length in [None, 77, 120]:
        with pytest.warns(UserWarning, match="dropped"):
            ids = tokenizers.t5(PROMPTS, length)
        assert ids.shape[1] == (length or 256)  # LONG_T5 stretches the default length to the cap
        ref = hf(PROMPTS, padding="max_length", max_length=ids.shape[1], truncation=True)
        for i, prompt in enumerate(PROMPTS):
            assert ids[i].tolist() == ref.input_ids[i], prompt


# ---- tokenizers: lengths, truncation warnings, folders -------------------------------------------


def test_truncation_warns_with_counts(tokenizers):
    n_clip = len(tokenizers.clip_l.tokenizer.encode(LONG_CLIP, add_special_tokens=False).ids)
    with pytest.warns(UserWarning, match=f"dropped the last {n_clip - 75} of {n_clip} tokens"):
        ids = tokenizers.clip_g([LONG_CLIP])
    assert ids.shape == (1, 77) and ids[0, 0] == 49406 and ids[0, 76] == 49407

    n_t5 = len(tokenizers.t5.tokenizer.encode(LONG_T5, add_special_tokens=False).ids)
    assert n_t5 > 256
    with pytest.warns(UserWarning, match=f"dropped the last {n_t5 - 255} of {n_t5} tokens"):
        ids = tokenizers.t5([LONG_T5, "a photo of a cat"])
    assert ids.shape == (2, 256) and ids[0, -1] == 1 and ids[1, :8].tolist() == CAT_T5

    # between 77 and 256 tokens: a longer T5 context, no warning ("a cat" is ▁ a ▁cat: 3 tokens)
    medium = " ".join(["a cat"] * 50)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ids = tokenizers.t5([medium, ""])
    assert ids.shape == (2, 151) and ids[0, -1] == 1 and ids[1, :2].tolist() == [1, 0]
    with pytest.raises(ValueError, match="at least 1"):
        tokenizers.t5(["x"], 0)


def test_folder_files_take_precedence(plain_files, tmp_path):
    # a folder whose CLIP vocabulary swaps "cat</w>" and "dog</w>" must be read, not the bundled one
    root = tmp_path / "model"
    shutil.copytree(plain_files / "tokenizer", root / "tokenizer")
    vocab = json.loads((root / "tokenizer" / "vocab.json").read_text())
    vocab["cat</w>"], vocab["dog</w>"] = vocab["dog</w>"], vocab["cat</w>"]
    (root / "tokenizer" / "vocab.json").write_text(json.dumps(vocab))
    tok = Tokenizers.from_folder(root)
    assert tok.clip_l(["a photo of a cat"])[0, :7].tolist() == CAT_CLIP[:5] + [1929, 49407]
    # missing tokenizer_2 / tokenizer_3 fall back to the bundled files, with SD3's padding
    assert tok.clip_g(["a photo of a cat"])[0, :8].tolist() == CAT_CLIP + [0]
    assert tok.t5(["a photo of a cat"])[0, :8].tolist() == CAT_T5

    full = Tokenizers.from_folder(plain_files)
    assert full.clip_g(["a photo of a cat"])[0, :8].tolist() == CAT_CLIP + [CLIP_G_PAD]
    assert full.t5(["a photo of a cat"])[0, :8].tolist() == CAT_T5

    (tmp_path / "sp").mkdir()
    (tmp_path / "sp" / "spiece.model").write_bytes(b"\x00")
    with pytest.raises(ValueError, match="spiece.model but no tokenizer.json"):
        T5Tokenizer.from_folder(tmp_path / "sp")
    with pytest.raises(FileNotFoundError):
        CLIPTokenizer.from_folder(tmp_path / "sp", CLIP_L_PAD)


# ---- conditioning against diffusers --------------------------------------------------------------


def tiny_encoders():
    """Random tiny transformers CLIP-L-like, CLIP-G-like and T5 encoders, and ours with the same weights."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5EncoderModel
    from transformers import T5Config as HFT5Config

    torch.manual_seed(0)
    clip_kw = dict(
        vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407
    )
    hf_l = CLIPTextModelWithProjection(
        CLIPTextConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                       num_attention_heads=1, projection_dim=64, hidden_act="quick_gelu", **clip_kw)
    ).eval()  # fmt: skip
    hf_g = CLIPTextModelWithProjection(
        CLIPTextConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                       num_attention_heads=2, projection_dim=128, hidden_act="gelu", **clip_kw)
    ).eval()  # fmt: skip
    # SD3's CLIP-L text_projection is the identity: its pooled vector goes in unprojected
    with torch.no_grad():
        hf_l.text_projection.weight.copy_(torch.eye(64))
    hf_t5 = T5EncoderModel(
        HFT5Config(vocab_size=32128, d_model=256, d_kv=64, num_heads=3, d_ff=192, num_layers=2,
                   feed_forward_proj="gated-gelu", relative_attention_num_buckets=32,
                   relative_attention_max_distance=128)
    ).eval()  # fmt: skip

    def ours(model, hf):
        state = {k: v for k, v in hf.state_dict().items() if k in model.state_dict()}
        model.load_state_dict(state, strict=True)
        return model.eval()

    shapes = lambda m: {k: v.shape for k, v in m.state_dict().items()}  # noqa: E731
    clip_l = ours(CLIPTextModel(CLIPConfig.from_shapes(shapes(hf_l), "quick_gelu")), hf_l)
    clip_g = ours(
        CLIPTextModel(CLIPConfig.from_shapes(shapes(hf_g), "gelu", project_pooled=True)), hf_g
    )
    t5 = ours(T5Encoder(T5Config.from_shapes(shapes(hf_t5))), hf_t5)
    return (hf_l, hf_g, hf_t5), (clip_l, clip_g, t5)


@pytest.fixture(scope="module")
def encoders():
    return tiny_encoders()


def diffusers_pipe(hf, plain_files, with_t5=True):
    """diffusers' SD3 pipeline without transformer or VAE; its prompts must avoid "!" (see
    test_clip_matches_transformers)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from transformers import CLIPTokenizer as HFCLIPTokenizer
    from transformers import T5TokenizerFast

    hf_l, hf_g, hf_t5 = hf
    folder = plain_files / "tokenizer"
    pipe = StableDiffusion3Pipeline(
        transformer=None,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=None,
        text_encoder=hf_l,
        tokenizer=HFCLIPTokenizer.from_pretrained(folder, model_max_length=77),
        text_encoder_2=hf_g,
        tokenizer_2=HFCLIPTokenizer.from_pretrained(folder, model_max_length=77, pad_token="!"),
        text_encoder_3=hf_t5 if with_t5 else None,
        tokenizer_3=T5TokenizerFast(
            tokenizer_file=str(plain_files / "tokenizer_3" / "tokenizer.json")
        ),
    )
    return pipe


def diffusers_encode(pipe, prompts, max_sequence_length):
    context, _, pooled, _ = pipe.encode_prompt(
        prompt=prompts,
        prompt_2=None,
        prompt_3=None,
        device=torch.device("cpu"),
        do_classifier_free_guidance=False,
        max_sequence_length=max_sequence_length,
    )
    return context, pooled


@pytest.mark.parametrize(
    "prompts, t5_length",
    [
        (["a photo of a cat", "", "Straße Ærøskøbing 東京 🐱, 1,000 pears"], None),
        (["a photo of a cat", LONG_CLIP, LONG_T5], 120),
    ],
)
def test_conditioning_matches_diffusers(encoders, tokenizers, plain_files, prompts, t5_length):
    hf, (clip_l, clip_g, t5) = encoders
    ours = TextEncoders(clip_l, clip_g, t5, tokenizers, t5_length=t5_length)
    assert ours.context_width == 256  # the T5 width, wider than CLIP-L + CLIP-G = 192
    pipe = diffusers_pipe(hf, plain_files)
    with torch.no_grad():
        context, pooled = quiet(ours.encode, prompts)
        ref_context, ref_pooled = quiet(diffusers_encode, pipe, prompts, t5_length or 77)
    assert context.shape == (3, 77 + (t5_length or 77), 256) and pooled.shape == (3, 192)
    err_c, err_p = max_rel_err(context, ref_context), max_rel_err(pooled, ref_pooled)
    print(f"context max rel err {err_c:.2e}, pooled {err_p:.2e}")
    assert err_c < 1e-6 and err_p < 1e-6
    assert (context[:, :77, 192:] == 0).all()  # the CLIP half is zero-padded to the context width


def test_clip_length_reads_the_first_positions(encoders, tokenizers, plain_files):
    """A model that reads n < 77 CLIP positions (the bundled one reads 24) gets diffusers' context
    with CLIP rows n..76 left out; T5 and the pooled vectors are untouched."""
    hf, (clip_l, clip_g, t5) = encoders
    prompts = ["a photo of a cat", "two red circles to the left of a blue square and a tree"]
    n = 10  # the second prompt's EOS lies beyond position 9
    ours = TextEncoders(clip_l, clip_g, t5, tokenizers, t5_length=20, clip_length=n)
    pipe = diffusers_pipe(hf, plain_files)
    with torch.no_grad(), pytest.warns(UserWarning, match=r"reads 10 CLIP positions.*prompt 1"):
        context, pooled = ours.encode(prompts)
    with torch.no_grad():
        ref_context, ref_pooled = quiet(diffusers_encode, pipe, prompts, 20)
    assert context.shape == (2, n + 20, 256)
    ref = torch.cat([ref_context[:, :n], ref_context[:, 77:]], dim=1)
    err = max(max_rel_err(context, ref), max_rel_err(pooled, ref_pooled))
    print(f"clip_length {n} vs diffusers' rows: max rel err {err:.2e}")
    assert err < 1e-6
    for bad in (1, 78):
        with pytest.raises(ValueError, match=f"clip_length must be in \\[2, 77\\], got {bad}"):
            TextEncoders(clip_l, clip_g, t5, tokenizers, clip_length=bad)


def test_no_t5_matches_diffusers(encoders, tokenizers, plain_files):
    hf, (clip_l, clip_g, _) = encoders
    prompts = ["a photo of a cat", "snow at night"]
    ours = TextEncoders(clip_l, clip_g, None, tokenizers, context_width=256)
    pipe = diffusers_pipe(hf, plain_files, with_t5=False)
    # diffusers reads the zero block's width from the transformer config; it has no transformer here
    pipe.transformer = SimpleNamespace(config=SimpleNamespace(joint_attention_dim=256))
    with torch.no_grad():
        context, pooled = ours.encode(prompts)
        ref_context, ref_pooled = diffusers_encode(pipe, prompts, 77)
    assert context.shape == (2, 154, 256)
    assert (context[:, 77:] == 0).all()
    err = max(max_rel_err(context, ref_context), max_rel_err(pooled, ref_pooled))
    print(f"no-T5 max rel err {err:.2e}")
    assert err < 1e-6


def test_encoders_checks_and_dtype(encoders, tokenizers):
    _, (clip_l, clip_g, t5) = encoders
    with pytest.raises(ValueError, match="context_width 128 is narrower"):
        TextEncoders(clip_l, clip_g, None, tokenizers, context_width=128)
    with pytest.raises(ValueError, match="context_width 200 is narrower"):
        TextEncoders(clip_l, clip_g, t5, tokenizers, context_width=200)
    with pytest.raises(ValueError, match="at least one prompt"):
        TextEncoders(clip_l, clip_g, None, tokenizers).encode([])

    # without T5 the default width is CLIP-L + CLIP-G, and a fixed T5 length sizes the zero block
    ours = TextEncoders(clip_l, clip_g, None, tokenizers, t5_length=10)
    with torch.no_grad():
        context, pooled = ours.encode("a photo of a cat")
        ref_l, ref_l_pooled = clip_l(tokenizers.clip_l(["a photo of a cat"]))
    assert context.shape == (1, 87, 192) and pooled.shape == (1, 192)
    assert torch.equal(context[:, :77, :64], ref_l) and torch.equal(pooled[:, :64], ref_l_pooled)

    ours = copy.deepcopy(TextEncoders(clip_l, clip_g, t5, tokenizers)).to(torch.float64)
    with torch.no_grad():
        context, pooled = ours.encode(["a photo of a cat"])
    assert context.dtype == pooled.dtype == torch.float64
