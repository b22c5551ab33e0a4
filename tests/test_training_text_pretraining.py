"""Text-encoder pre-training on caption structure (`sd3.shapes.text_pretraining`): the labels
against hand-derived ones, and a short run that must teach tiny encoders word order."""

import pytest
import torch

from sd3.models.clip import CLIPConfig, CLIPTextModel
from sd3.models.t5 import T5Config, T5Encoder
from sd3.shapes.scenes import heldout_prompts, parse_caption
from sd3.shapes.text_pretraining import pretrain_text_encoders, structure, swap_cosine
from sd3.text import TextEncoders


def test_structure_labels_by_hand():
    # colours 1-8 in palette order (red, orange, yellow, green, cyan, blue, purple, black),
    # shapes 1-3 (circle, square, triangle), relations 1-4 (left of, right of, above, below);
    # then (colour, shape) on the left, right, top, bottom
    below = structure(parse_caption("an orange square below a red circle"))
    assert below.tolist() == [2, 2, 1, 1, 1, 1] + [0] * 6 + [4] + [0, 0, 0, 0, 1, 1, 2, 2]
    right = structure(parse_caption("a black triangle to the right of a cyan square"))
    assert right.tolist() == [8, 3, 1, 5, 2, 1] + [0] * 6 + [2] + [5, 2, 8, 3, 0, 0, 0, 0]
    pair = structure(parse_caption("two cyan squares and a black triangle"))
    assert pair.tolist() == [5, 2, 2, 8, 3, 1] + [0] * 6 + [0] + [0] * 8
    group = structure(parse_caption("a green circle, two blue triangles and a purple square"))
    assert group.tolist() == [4, 1, 1, 6, 3, 2, 7, 2, 1, 0, 0, 0, 0] + [0] * 8
    assert structure(None).tolist() == [0] * 21


def _encoders(seed: int = 0) -> TextEncoders:
    torch.manual_seed(seed)
    w = 32
    clip = CLIPConfig(width=w, layers=2, heads=1, mlp_width=2 * w)
    clip_g = CLIPConfig(width=w, layers=2, heads=1, mlp_width=2 * w, project_pooled=True)
    t5 = T5Encoder(T5Config(d_model=w, layers=2, heads=1, d_ff=2 * w))
    return TextEncoders(
        CLIPTextModel(clip).eval(), CLIPTextModel(clip_g).eval(), t5.eval(),
        context_width=2 * w, t5_length=24, clip_length=24,
    )  # fmt: skip


def test_pretraining_teaches_word_order():
    text = _encoders()
    heldout = [p.text for p in heldout_prompts()]
    before = swap_cosine(text, heldout)
    assert before["pooled"] > 0.99  # random encoders: "A above B" ~ "B above A"
    untouched = {k: v.clone() for k, v in text.state_dict().items()}
    report = pretrain_text_encoders(
        text, steps=200, heldout=heldout, batch_size=64, lr=1e-2, pool=2000, progress=False
    )
    assert report.loss_last < 0.3 * report.loss_first
    # held-out captions (combinations never trained on) read right, where chance is ~0 and the
    # untrained readout reads none. Groups and relation, all 13 labels: 0.81 from the tokens,
    # 0.40 from pooled. The four sides of relation captions (which object goes where): 0.17 from
    # the tokens, against 1/(9*4)^2 ~ 0.001 by chance
    assert report.heldout_accuracy["context"] > 0.5
    assert report.heldout_accuracy["pooled"] > 0.2
    assert report.heldout_accuracy["context_sides"] > 0.08
    assert report.swap_cosine["pooled"] < before["pooled"] - 0.01  # 0.9996 -> 0.972
    assert 0 < report.drift < 0.5  # the distillation term keeps the outputs near their start
    assert not any(p.requires_grad for p in text.parameters())  # frozen again
    moved = [k for k, v in text.state_dict().items() if not torch.equal(v, untouched[k])]
    assert moved


def test_pretraining_rejects_bad_settings():
    with pytest.raises(ValueError, match="steps"):
        pretrain_text_encoders(_encoders(), steps=0, heldout=[])
    with pytest.raises(ValueError, match="keep_weight"):
        pretrain_text_encoders(_encoders(), steps=1, heldout=[], keep_weight=-1)
