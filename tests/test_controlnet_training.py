"""ControlNet training (`sd3 train --controlnet`, `sd3.training.controlnet`), the shapes scenes'
edges as control images, and the bundled canny ControlNet.

Edge tolerance: over 20 scenes at 128x128, `render_edges` against cv2.Canny(render(scene), 100,
200): every Canny edge pixel lies within 1 px of a rendered one, >= 98% of the rendered edge
pixels within 1 px of a Canny one, and the edge pixel counts agree within 15% (measured over 40
scenes: 100%, >= 99.0%, 0.88-1.03). They are not pixel-identical: along an anti-aliased edge
Canny's pick of the side flips where the rendered one keeps its rule.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import read_layout, tiny_models
from PIL import Image
from safetensors import safe_open

from sd3.checkpoints import open_controlnet
from sd3.models.mmdit import MMDiT
from sd3.pipeline import Pipeline
from sd3.shapes.scenes import render, render_edges, sample_scene
from sd3.text import TextEncoders
from sd3.training.controlnet import (
    check_blocks,
    controlled,
    controlnet_from_base,
    save_controlnet,
    valid_block_counts,
)
from sd3.training.trainer import TrainConfig, Trainer

ASSETS = Path(__file__).resolve().parents[1] / "src" / "sd3" / "assets" / "default"
BUNDLED = ASSETS / "sd3_shapes.safetensors"
BUNDLED_CONTROLNET = ASSETS / "sd3_shapes_controlnet_canny.safetensors"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def inputs(mmdit: MMDiT, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    c = mmdit.config
    x = torch.randn(2, c.in_channels, 8, 8, generator=g)
    context = torch.randn(2, 5, c.context_dim, generator=g)
    pooled = torch.randn(2, c.pooled_dim, generator=g)
    control = torch.randn(2, c.in_channels, 8, 8, generator=g)
    return x, torch.tensor([250.0, 900.0]), context, pooled, control


def test_a_fresh_controlnet_is_the_base_model_exactly():
    mmdit = tiny_models(3)["mmdit"]  # depth 3, attn2 (MMDiT-X) in block 0
    net = controlnet_from_base(mmdit, 1)
    # copied from the base's first block: its image stream, attn and mlp modulations only
    block, source = net.transformer_blocks[0], mmdit.joint_blocks[0].x_block
    assert torch.equal(block.attn.qkv.weight, source.attn.qkv.weight)
    assert torch.equal(block.mlp.fc2.bias, source.mlp.fc2.bias)
    assert torch.equal(
        block.adaLN_modulation[1].weight, source.adaLN_modulation[1].weight[: 6 * 128]
    )
    assert torch.equal(net.t_embedder.mlp[2].weight, mmdit.t_embedder.mlp[2].weight)
    assert not net.controlnet_blocks[0].weight.any() and not net.pos_embed_input.proj.weight.any()
    x, t, context, pooled, control = inputs(mmdit)
    with torch.no_grad():
        base = mmdit(x, t, context, pooled)
        with_net = controlled(mmdit, net, control)(x, t, context, pooled)
    assert torch.equal(with_net, base)
    assert valid_block_counts(6) == [1, 2, 3, 6] and valid_block_counts(38)[-2:] == [19, 38]
    with pytest.raises(ValueError, match="4 blocks cannot serve the MMDiT's 6 blocks.*1, 2, 3, 6"):
        check_blocks(4, 6)


def test_controlnet_training_moves_the_controlnet_and_keeps_the_base_frozen(tmp_path):
    models = tiny_models(4)
    mmdit = models["mmdit"]
    text = TextEncoders(models["clip_l"], models["clip_g"], models["t5xxl"], context_width=256)
    before = {k: v.clone() for k, v in mmdit.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(8, 16, 8, 8, generator=g)
    controls = latents.sign()  # a control that tells the target apart
    config = TrainConfig(
        steps=6, batch_size=4, lr=3e-3, controlnet_blocks=1, ema_decay=0, checkpoint_every=100
    )
    trainer = Trainer(
        config, mmdit, text, latents, ["a red circle"] * 8, tmp_path, progress=False,
        controls=controls,
    )  # fmt: skip
    assert set(trainer.params) == {
        f"controlnet.{k}" for k, _ in trainer.controlnet.named_parameters()
    }
    assert not any(p.requires_grad for p in mmdit.parameters())
    first = [trainer.train_step()[0].item() for _ in range(2)]
    # step 1 trains the zero outputs alone (nothing reaches the rest yet), step 2 the rest too
    assert trainer.controlnet.controlnet_blocks[0].weight.abs().max() > 1e-3
    assert trainer.controlnet.pos_embed_input.proj.weight.abs().max() > 1e-4
    losses = first + [trainer.train_step()[0].item() for _ in range(4)]
    assert all(np.isfinite(losses))
    batch = trainer.batch(0)  # the same batch, before and after
    with torch.no_grad():
        fresh = controlnet_from_base(mmdit, 1)
        initial = trainer.objective.loss(controlled(mmdit, fresh, batch["control"]),
                                         batch["x0"], batch["noise"], batch["sigma"],
                                         batch["context"], batch["pooled"]).item()  # fmt: skip
        now = trainer.objective(**batch).item()
    assert now < 0.97 * initial, (initial, now)
    for k, v in mmdit.state_dict().items():
        assert torch.equal(v, before[k]), k
    trainer.save()
    assert trainer.resume() == 6  # the checkpoint holds the ControlNet by name


def test_export_is_stabilitys_layout_and_loads_as_canny(tmp_path):
    mmdit = tiny_models(5)["mmdit"]
    net = controlnet_from_base(mmdit, 1)
    path = save_controlnet(tmp_path / "cn.safetensors", net, "canny", torch.float16)
    official = {k for k in read_layout("controlnet_sd35_large") if ".0." in k or "blocks" not in k}
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
        control_type = f.get_tensor("control_type")
    assert keys == official, keys ^ official
    assert control_type.dtype == torch.int32 and control_type.tolist() == [1]
    component = open_controlnet(path)
    assert component.control_type == "canny"


def test_render_edges_match_opencv_canny():
    cv2 = pytest.importorskip("cv2")

    def within_one_pixel(a: np.ndarray, b: np.ndarray) -> float:
        """Share of a's pixels within 1 px (Euclidean) of one of b's."""
        distance = cv2.distanceTransform((~b).astype(np.uint8), cv2.DIST_L2, 5)
        return float((distance[a] <= 1).mean())

    for i in range(20):
        scene = sample_scene(3, i)
        canny = cv2.Canny(np.asarray(render(scene, 128)), 100, 200) > 0
        edges = np.asarray(render_edges(scene, 128))
        assert edges.shape == (128, 128, 3) and set(np.unique(edges)) == {0, 255}
        ours = edges[..., 0] > 0
        assert within_one_pixel(canny, ours) >= 0.999, i
        assert within_one_pixel(ours, canny) >= 0.98, i
        assert 0.85 <= ours.sum() / canny.sum() <= 1.15, i


@pytest.mark.skipif(not BUNDLED_CONTROLNET.is_file(), reason="no bundled ControlNet")
def test_bundled_controlnet_is_canny_and_strength_0_is_the_base_image():
    component = open_controlnet(BUNDLED_CONTROLNET)
    assert component.control_type == "canny" and BUNDLED_CONTROLNET.stat().st_size < 8e6
    preset = json.loads(component.metadata["sd3_preset"])
    assert preset["size"] == 128 and preset["clip_length"] == 24
    base = Pipeline.from_single_file(BUNDLED, dtype=torch.float32)
    pipe = Pipeline.from_single_file(BUNDLED, dtype=torch.float32, controlnets=[BUNDLED_CONTROLNET])
    assert pipe.preset == base.preset  # the base model's preset, not the reference's 60 steps
    edges = render_edges(sample_scene(7, 0), 128)
    settings = {"prompt": "a red circle above a blue square", "seed": 3, "num_inference_steps": 6}
    plain = np.asarray(base(**settings)[0])
    off = np.asarray(pipe(**settings, control_images=[edges], control_strength=0.0)[0])
    on = np.asarray(pipe(**settings, control_images=[edges])[0])
    assert np.array_equal(off, plain)
    assert np.abs(on.astype(int) - plain).mean() > 1.0  # it does change the image
    assert isinstance(edges, Image.Image)


@pytest.mark.skipif(not BUNDLED_CONTROLNET.is_file(), reason="no bundled ControlNet")
def test_cli_takes_the_bundled_controlnet_by_its_short_name(tmp_path):
    from sd3.cli import main

    scene = tmp_path / "scene.png"
    render(sample_scene(7, 1), 128).save(scene)
    out = tmp_path / "out.png"
    argv = [
        "generate", "a red circle above a blue square", "--controlnet", "shapes-canny",
        "--control-image", str(scene), "--control-preprocess", "canny", "--steps", "3",
        "--out", str(out),
    ]  # fmt: skip
    assert main(argv) == 0
    with Image.open(out) as im:
        record = json.loads(im.text["sd3"])
        assert im.size == (128, 128)
    assert record["files"]["controlnet"][0]["name"] == BUNDLED_CONTROLNET.name


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--controlnet", "--data", "."], "--controlnet trains on --shapes N"),
        (["--shapes", "8", "--controlnet-blocks", "2"], "--controlnet-blocks applies to"),
        (["--shapes", "8", "--controlnet", "--controlnet-blocks", "4"], "4 blocks cannot serve"),
        (["--shapes", "8", "--controlnet", "--lora-rank", "4"], "frozen: no --lora-rank"),
    ],
)
def test_train_controlnet_option_errors(tmp_path, capsys, extra, message):
    from sd3.training.command import main

    argv = ["--model", str(BUNDLED), "--resolution", "128", "--out", str(tmp_path / "o"), *extra]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
