"""The training loop: exact resume, crash-safe checkpoints, EMA, gradient checkpointing, bf16,
LoRA and joint text-encoder training, and the image-folder dataset."""

import copy
import json

import numpy as np
import pytest
import torch
from helpers import max_rel_err, tiny_models
from PIL import Image

import sd3.training.checkpoint as checkpoint_module
from sd3.checkpoints import CheckpointError, SafetensorsFile
from sd3.text import TextEncoders
from sd3.training.checkpoint import load_checkpoint
from sd3.training.data import ImageCaptionFolder, load_image
from sd3.training.flow import flow_loss
from sd3.training.trainer import TrainConfig, Trainer, enable_gradient_checkpointing

CAPTIONS = ["a red circle", "two blue squares", "a green triangle above a red square", "", "a cat"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from a second thread, and on a busy machine threads thrash."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def family():
    return tiny_models()


def make_trainer(family, out_dir, n=6, **overrides) -> Trainer:
    """A fresh copy of the tiny family training on n random 4x4 latents (32x32 images)."""
    m = copy.deepcopy(family)
    encoders = TextEncoders(m["clip_l"], m["clip_g"], m["t5xxl"])
    latents = torch.randn(n, 16, 4, 4, generator=torch.Generator().manual_seed(5))
    captions = [CAPTIONS[i % len(CAPTIONS)] for i in range(n)]
    config = TrainConfig(
        **{"steps": 6, "batch_size": 4, "lr": 1e-3, "checkpoint_every": 3} | overrides
    )
    out_dir.mkdir(exist_ok=True)
    return Trainer(config, m["mmdit"], encoders, latents, captions, out_dir, progress=False)


def log_losses(out_dir) -> list[float]:
    return [json.loads(line)["loss"] for line in (out_dir / "log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(
    "overrides",
    [{}, {"train_text_encoders": True, "text_encoder_lr": 3e-3}],
    ids=["mmdit", "joint"],
)
def test_resume_continues_exactly(family, tmp_path, overrides):
    """6 steps in one go == 4 steps (checkpoint at 3 and at the end), then resume to 6: same loss
    curve, weights, EMA and optimizer state, bit for bit (also with the text encoders as a second
    optimizer group)."""
    whole = make_trainer(family, tmp_path / "whole", **overrides)
    assert whole.train() == 6
    part = make_trainer(family, tmp_path / "part", steps=4, **overrides)
    assert part.train() == 4
    # a new process, as after a crash
    resumed = make_trainer(family, tmp_path / "part", **overrides)
    assert resumed.resume() == 4
    assert resumed.train() == 6
    assert log_losses(tmp_path / "part") == log_losses(tmp_path / "whole")
    assert len(log_losses(tmp_path / "whole")) == 6
    a, _ = load_checkpoint(tmp_path / "whole" / "checkpoint.safetensors")
    b, state = load_checkpoint(tmp_path / "part" / "checkpoint.safetensors")
    assert state["step"] == 6 and a.keys() == b.keys()
    assert any(k.startswith("optimizer.") and k.endswith("exp_avg_sq") for k in a)
    assert any(k.startswith("ema.") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    losses = log_losses(tmp_path / "whole")
    assert losses[-1] != losses[0]


def test_resume_rejects_a_different_run(family, tmp_path):
    make_trainer(family, tmp_path / "full", steps=1).train()
    lora = make_trainer(family, tmp_path / "lora", lora_rank=2)
    with pytest.raises(ValueError, match="trainable tensors do not match"):
        lora.resume(tmp_path / "full" / "checkpoint.safetensors")


def test_failed_save_leaves_the_last_checkpoint_intact(family, tmp_path, monkeypatch):
    trainer = make_trainer(family, tmp_path, steps=3)
    trainer.train()
    path = tmp_path / "checkpoint.safetensors"
    before = path.read_bytes()
    real_save = checkpoint_module.save_file

    def dies_halfway(tensors, filename, metadata=None):  # e.g. a full disk or a kill mid-write
        real_save(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:
            f.truncate(f.seek(0, 2) // 2)
        raise OSError("No space left on device")

    monkeypatch.setattr(checkpoint_module, "save_file", dies_halfway)
    with pytest.raises(OSError, match="No space left"):
        trainer.save()
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if ".tmp" in p.name] == []
    _, state = load_checkpoint(path)
    assert state["step"] == 3
    # a torn file is refused with a clear error, never half-loaded
    torn = tmp_path / "torn.safetensors"
    torn.write_bytes(before[: len(before) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(torn)


def test_ema_follows_its_recursion(family, tmp_path):
    trainer = make_trainer(family, tmp_path, ema_decay=0.9)
    name = "mmdit.joint_blocks.0.x_block.attn.qkv.weight"
    expected = trainer.params[name].detach().clone()
    for step in range(1, 5):
        trainer.train_step()
        decay = min(0.9, (1 + step) / (10 + step))
        expected = decay * expected + (1 - decay) * trainer.params[name].detach()
    err = max_rel_err(trainer.ema[name], expected)
    print(f"EMA vs recursion: {err:.2e}")
    assert err < 1e-6 and not torch.equal(trainer.ema[name], trainer.params[name])
    with trainer.ema_weights():
        assert torch.equal(trainer.params[name], trainer.ema[name])
    assert not torch.equal(trainer.params[name], trainer.ema[name])


def test_every_sample_once_per_epoch(family, tmp_path):
    trainer = make_trainer(family, tmp_path, n=10, batch_size=4)
    seen = torch.cat([trainer.batch(s)["x0"] for s in range(5)])  # 20 samples = 2 epochs
    for epoch in (seen[:10], seen[10:]):
        rows = {tuple(x.flatten().tolist()) for x in epoch}
        assert rows == {tuple(x.flatten().tolist()) for x in trainer.latents}
    assert not torch.equal(seen[:10], seen[10:])  # reshuffled


def test_paired_examples_share_a_batch_and_their_draws(family, tmp_path):
    trainer = make_trainer(family, tmp_path, n=10, batch_size=4, paired=True, text_dropout=0.5)
    # one caption per pair, so that a pair's text embeddings differ only if their dropout does
    trainer.rows = trainer.text_cache.rows([CAPTIONS[i // 2] for i in range(10)])
    rows = {tuple(x.flatten().tolist()): i for i, x in enumerate(trainer.latents)}
    seen = []
    for step in range(5):  # 20 samples = 2 epochs of the 5 pairs
        b = trainer.batch(step)
        index = [rows[tuple(x.flatten().tolist())] for x in b["x0"]]
        seen += index
        for k in (0, 2):  # examples 2j and 2j + 1, side by side, same noise / sigma / dropout
            assert index[k] % 2 == 0 and index[k + 1] == index[k] + 1
            for key in ("noise", "sigma", "context", "pooled"):
                assert torch.equal(b[key][k], b[key][k + 1]), key
        assert not torch.equal(b["noise"][0], b["noise"][2])
    assert sorted(seen[:10]) == sorted(seen[10:]) == list(range(10))
    assert seen[:10] != seen[10:]  # pairs reshuffled
    with pytest.raises(ValueError, match="even number of latents, got 9"):
        make_trainer(family, tmp_path / "odd", n=9, paired=True)


def test_gradient_checkpointing_same_gradients(family, tmp_path):
    plain = make_trainer(family, tmp_path / "a")
    ckpt = make_trainer(family, tmp_path / "b")
    enable_gradient_checkpointing(ckpt.mmdit)
    assert ckpt.mmdit.state_dict().keys() == plain.mmdit.state_dict().keys()
    for trainer in (plain, ckpt):
        trainer.model(**trainer.batch(0)).backward()
    worst = max(max_rel_err(ckpt.params[n].grad, p.grad) for n, p in plain.params.items())
    print(f"gradient checkpointing vs plain: worst gradient rel err {worst:.2e}")
    assert worst < 1e-5


def test_bf16_autocast_step(family, tmp_path):
    fp32 = make_trainer(family, tmp_path / "a")
    bf16 = make_trainer(family, tmp_path / "b", bf16=True)
    loss32, _ = fp32.train_step()
    loss16, _ = bf16.train_step()
    name = "mmdit.joint_blocks.0.x_block.attn.qkv.weight"
    assert bf16.params[name].dtype == torch.float32
    rel = abs(loss16.item() - loss32.item()) / loss32.item()
    print(f"bf16 vs fp32 loss: rel diff {rel:.2e}")
    assert 0 < rel < 2e-2


def test_compiled_training_matches_eager(family, tmp_path):
    """torch.compile'd steps (the bundled model's recipe) give the eager losses and weights."""
    eager = make_trainer(family, tmp_path / "a", steps=2)
    compiled = make_trainer(family, tmp_path / "b", steps=2, compile=True)
    assert eager.train() == compiled.train() == 2
    loss_err = max(
        abs(a - b) / a
        for a, b in zip(log_losses(tmp_path / "a"), log_losses(tmp_path / "b"), strict=True)
    )
    weight_err = max(max_rel_err(compiled.params[n], p) for n, p in eager.params.items())
    print(f"compiled vs eager: loss rel err {loss_err:.2e}, weights max rel err {weight_err:.2e}")
    assert loss_err < 1e-5 and weight_err < 3e-4  # measured 8e-5; a step moves weights by up to lr


def test_lora_training_changes_only_the_adapters(family, tmp_path):
    trainer = make_trainer(family, tmp_path, lora_rank=2, lora_targets=("attn.qkv", "mlp.fc1"))
    base = {k: v.clone() for k, v in trainer.mmdit.state_dict().items() if "lora" not in k}
    trainer.train()
    assert set(trainer.params) == {
        n for n, _ in trainer.objective.named_parameters() if ".lora_" in n
    }
    after = trainer.mmdit.state_dict()
    assert all(torch.equal(after[k], v) for k, v in base.items())
    assert any(after[k].abs().sum() > 0 for k in after if k.endswith("lora_B.weight"))
    tensors, _ = load_checkpoint(tmp_path / "checkpoint.safetensors")
    assert all(".lora_" in k for k in tensors)


def test_joint_text_encoder_training(family, tmp_path):
    """Joint training: the step's loss and the gradients reaching CLIP-L, CLIP-G and T5 are what
    autograd gives through the sampling path (`TextEncoders.encode`, then the flow loss)."""
    trainer = make_trainer(family, tmp_path, steps=2, train_text_encoders=True, text_dropout=0)
    assert trainer.text_cache is None
    batch = trainer.batch(0)
    loss = trainer.model(**batch)
    loss.backward()
    encoders = {n: p for n, p in trainer.params.items() if n.startswith("text_encoders.")}
    assert {n.split(".")[1] for n in encoders} == {"clip_l", "clip_g", "t5"}
    ours = {n: p.grad.clone() for n, p in encoders.items() if p.grad is not None}
    trainer.optimizer.zero_grad(set_to_none=True)

    prompts = [trainer.captions[i] for i in trainer.order(0)[:4].tolist()]
    encode = TextEncoders.encode.__wrapped__  # the sampling path, without its torch.no_grad
    context, pooled = encode(trainer.text_encoders, prompts)
    ref = flow_loss(trainer.mmdit, batch["x0"], batch["noise"], batch["sigma"], context, pooled)
    grads = torch.autograd.grad(ref, list(encoders.values()), allow_unused=True)
    ref_grads = {n: g for n, g in zip(encoders, grads, strict=True) if g is not None}
    assert ours.keys() == ref_grads.keys()
    for part in ("clip_l", "clip_g", "t5"):  # each encoder is reached, not only the last layers
        assert any(n.startswith(f"text_encoders.{part}.") and "embed" in n for n in ours), part
    err = max(max_rel_err(ours[n], ref_grads[n]) for n in ours)
    print(f"joint step vs encode + flow_loss: loss {loss.item():.6f} vs {ref.item():.6f}, "
          f"max rel err of {len(ours)} encoder gradients {err:.2e}")  # fmt: skip
    assert abs(loss.item() - ref.item()) < 1e-6 * ref.item()
    assert err < 1e-5

    name = "text_encoders.clip_g.text_model.encoder.layers.0.mlp.fc1.weight"
    before = trainer.params[name].detach().clone()
    trainer.train()
    assert not torch.equal(before, trainer.params[name])


def test_text_encoder_lr_is_the_first_adam_step(family, tmp_path):
    """Adam's first step moves each weight by lr * g / (|g| + eps): by at most lr, and by lr where
    the gradient is largest. So the largest move in each group is its lr (to 2e-4: the fp32
    rounding of weights near 1)."""
    trainer = make_trainer(family, tmp_path, steps=1, lr=1e-3, train_text_encoders=True,
                           text_encoder_lr=4e-3, ema_decay=0, grad_clip=0)  # fmt: skip
    before = {n: p.detach().clone() for n, p in trainer.params.items()}
    trainer.train()
    moved = {n: (p.detach() - before[n]).abs().max().item() for n, p in trainer.params.items()}
    encoders = max(v for n, v in moved.items() if n.startswith("text_encoders."))
    mmdit = max(v for n, v in moved.items() if not n.startswith("text_encoders."))
    print(f"largest first-step move: MMDiT {mmdit:.6e}, text encoders {encoders:.6e}")
    assert abs(mmdit - 1e-3) < 2e-7 and abs(encoders - 4e-3) < 8e-7


def test_training_reduces_the_loss(family, tmp_path):
    """Overfitting 2 latents with one caption: the loss at fixed (noise, sigma) falls."""
    trainer = make_trainer(family, tmp_path, n=2, steps=40, batch_size=2, lr=3e-3, text_dropout=0)
    batch = trainer.batch(0)
    with torch.no_grad():
        before = trainer.model(**batch).item()
    trainer.train()
    with torch.no_grad():
        after = trainer.model(**batch).item()
    print(f"loss {before:.3f} -> {after:.3f}")
    assert after < 0.7 * before


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"steps": 0}, "steps must be >= 1"),
        ({"batch_size": 0}, "batch_size must be >= 1"),
        ({"timestep_sampling": "cosine"}, "unknown timestep sampling 'cosine'"),
        ({"text_dropout": 1.5}, "text_dropout must be in"),
        ({"ema_decay": 1.0}, "ema_decay must be in"),
        ({"lr": 0.0}, "lr must be > 0"),
        ({"lora_rank": 4, "train_text_encoders": True}, "keeps the text encoders frozen"),
        ({"text_encoder_lr": 1e-3}, "text_encoder_lr needs train_text_encoders"),
        ({"text_encoder_lr": 0.0, "train_text_encoders": True}, "text_encoder_lr must be > 0"),
        ({"paired": True, "batch_size": 5}, "even batch_size, got 5"),
        ({"pair_contrast": 1.0}, "needs paired"),
        ({"pair_contrast": -1.0, "paired": True}, "pair_contrast must be >= 0"),
    ],
)
def test_bad_config_raises(overrides, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**overrides)


# --- image folder ---------------------------------------------------------------------------


def test_image_folder(tmp_path):
    # 48x24, left third red, rest blue: resized to 32x16, the centre 16x16 crop is x in 8..24
    pixels = np.zeros((24, 48, 3), np.uint8)
    pixels[:, :16] = (255, 0, 0)
    pixels[:, 16:] = (0, 0, 255)
    Image.fromarray(pixels).save(tmp_path / "b.png")
    (tmp_path / "b.txt").write_text("  red and blue \n")
    sub = tmp_path / "more"
    sub.mkdir()
    Image.fromarray(np.full((16, 16, 3), 255, np.uint8)).save(sub / "a.jpg")
    (sub / "a.txt").write_text("white")
    data = ImageCaptionFolder(tmp_path, 16)
    assert len(data) == 2
    image, caption = data[0]
    assert caption == "red and blue" and image.shape == (3, 16, 16)
    assert image.min() >= -1 and image.max() <= 1
    # crop columns 8..24 of the 32-wide resize: the red third ends at x = 10.67, i.e. crop x 2.67
    assert torch.allclose(image[:, :, 0], torch.tensor([1.0, -1, -1])[:, None], atol=0.02)
    assert torch.allclose(image[:, :, 8:], torch.tensor([-1.0, -1, 1])[:, None, None], atol=0.02)
    white, caption = data[1]
    assert caption == "white" and torch.allclose(white, torch.ones(3, 16, 16), atol=0.02)
    assert torch.equal(load_image(sub / "a.jpg", 16), white)


def test_image_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="holds no images"):
        ImageCaptionFolder(tmp_path, 32)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "lonely.png")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "ok.png")
    (tmp_path / "ok.txt").write_text("fine")
    with pytest.raises(ValueError, match=r"1 of 2 images .* have no caption file .*lonely\.png"):
        ImageCaptionFolder(tmp_path, 32)
    with pytest.raises(ValueError, match="does not exist"):
        ImageCaptionFolder(tmp_path / "nope", 32)
    with pytest.raises(ValueError, match="multiple of 16"):
        ImageCaptionFolder(tmp_path, 40)


def test_checkpoint_is_safetensors_with_json_state(family, tmp_path):
    make_trainer(family, tmp_path, steps=1).train()
    file = SafetensorsFile(tmp_path / "checkpoint.safetensors")
    state = json.loads(file.metadata["sd3_training"])
    assert state["step"] == 1 and state["config"]["batch_size"] == 4
    assert file.path.read_bytes()[:8] != b"\x80\x04"  # not a pickle


# --- fresh models -----------------------------------------------------------------------------


def test_fresh_mmdit_starts_at_zero_with_sincos_positions():
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    from sd3.training.fresh import INIT_CONFIGS, fresh_models

    models = fresh_models("tiny", seed=1)
    mmdit = models["mmdit"]
    size, dim = mmdit.config.pos_embed_max_size, mmdit.config.hidden_size
    ref = get_2d_sincos_pos_embed(dim, size, base_size=size, output_type="pt").float()
    err = max_rel_err(mmdit.pos_embed[0], ref)
    print(f"sin-cos table vs diffusers: {err:.2e}")
    assert err < 1e-6
    c = mmdit.config
    x = torch.randn(2, 16, 8, 8)
    out = mmdit(
        x,
        torch.tensor([100.0, 900.0]),
        torch.randn(2, 5, c.context_dim),
        torch.randn(2, c.pooled_dim),
    )
    assert torch.equal(out, torch.zeros_like(out))  # adaLN-Zero: every block starts as identity
    again = fresh_models("tiny", seed=1)
    assert all(
        torch.equal(v, again["vae"].state_dict()[k]) for k, v in models["vae"].state_dict().items()
    )
    assert set(INIT_CONFIGS) >= {"tiny", "small"}
    with pytest.raises(ValueError, match="unknown init config 'huge'"):
        fresh_models("huge")


def test_uncached_text_path_matches_the_cache(family, tmp_path, monkeypatch):
    """Frozen encoders run every step when the embedding cache would be too big: same losses."""
    import sd3.training.trainer as trainer_module

    cached = make_trainer(family, tmp_path / "a", text_dropout=0.5)
    monkeypatch.setattr(trainer_module, "TEXT_CACHE_BYTES", 0)
    direct = make_trainer(family, tmp_path / "b", text_dropout=0.5)
    assert cached.text_cache is not None and direct.text_cache is None
    assert not any(n.startswith("text_encoders.") for n in direct.params)
    for _ in range(2):
        a, _ = cached.train_step()
        b, _ = direct.train_step()
        print(f"cached vs direct text: loss {a.item():.6f} vs {b.item():.6f}")
        assert abs(a.item() - b.item()) < 1e-5 * a.item()
