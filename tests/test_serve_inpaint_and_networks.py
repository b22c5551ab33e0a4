"""`sd3 serve` with inpainting, LoRAs and ControlNets, through a real server process: A1111's
img2img mask fields mapped onto `sd3.inpainting` (or refused by name), native jobs with a mask,
LoRAs chosen by name from A1111's `<lora:name:strength>` prompt tags or the native `loras`
field, and ControlNets by name from A1111's ControlNet-extension units or the native `controls`."""

import io
import json

import numpy as np
import pytest
import torch
from helpers import randomize
from PIL import Image
from safetensors.torch import save_file
from serve_helpers import ServerProcess, decode_png, png_b64, wait_job

from sd3.cli import DEFAULT_MODEL
from sd3.pipeline import Pipeline

PROMPT = "a red circle above a blue square"
SIZE = 128


def write_lora(path):
    """A diffusers/PEFT LoRA on the bundled MMDiT's MLP outputs, strong enough to show."""
    layers = Pipeline.from_single_file(DEFAULT_MODEL, load=False).layers["mmdit"]
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for i in range(2):
        out, width = layers[f"joint_blocks.{i}.x_block.mlp.fc2"]
        key = f"transformer.transformer_blocks.{i}.ff.net.2"
        tensors[f"{key}.lora_A.weight"] = torch.randn(4, width, generator=g) * 0.5
        tensors[f"{key}.lora_B.weight"] = torch.randn(out, 4, generator=g) * 0.5
    save_file(tensors, str(path))


def write_controlnet(path):
    """An InstantX-kind ControlNet (diffusers' layout) that fits the bundled MMDiT, random."""
    from diffusers import SD3ControlNetModel

    net = SD3ControlNetModel(
        sample_size=32, num_layers=2, attention_head_dim=64, num_attention_heads=3,
        joint_attention_dim=128, caption_projection_dim=192, pooled_projection_dim=128,
        pos_embed_max_size=16, out_channels=16,
    )  # fmt: skip
    randomize(net, 3)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve-inpaint")
    (folder / "loras").mkdir()
    write_lora(folder / "loras" / "strong.safetensors")
    write_controlnet(folder / "edges.safetensors")
    process = ServerProcess(
        folder, "--steps", "4", "--max-width", "256", "--max-height", "256",
        "--lora-dir", str(folder / "loras"), "--controlnet", str(folder / "edges.safetensors"),
        "--no-previews",
    )  # fmt: skip
    yield process
    assert process.stop() == 0, process.log()


@pytest.fixture
def client(server):
    with server.client() as c:
        yield c
        assert c.get("/v1/health").json()["status"] == "ok"


def refused(response, field: str) -> str:
    assert response.status_code == 422, response.text
    text = json.dumps(response.json()["detail"])
    assert field in text, text
    return text


def init_image() -> Image.Image:
    """Stripes, so that kept and repainted pixels are easy to tell apart."""
    a = np.zeros((SIZE, SIZE, 3), np.uint8)
    a[:, :, 0] = 200
    a[::8, :, 2] = 255
    return Image.fromarray(a)


def half_mask() -> Image.Image:
    """White (repaint) on the left half."""
    a = np.zeros((SIZE, SIZE), np.uint8)
    a[:, : SIZE // 2] = 255
    return Image.fromarray(a)


def inpaint_body(**overrides) -> dict:
    return {
        "prompt": PROMPT, "init_images": [png_b64(init_image())], "mask": png_b64(half_mask()),
        "denoising_strength": 1.0, "steps": 4, "seed": 5, "width": SIZE, "height": SIZE,
        "mask_blur": 0, "inpainting_fill": 1, "inpaint_full_res": False,
        "inpaint_full_res_padding": 0, "inpainting_mask_invert": 0, **overrides,
    }  # fmt: skip


def pixels(b64: str) -> np.ndarray:
    return np.asarray(decode_png(b64).convert("RGB"), np.int16)


def test_a1111_inpainting_repaints_only_the_mask(client):
    original = np.asarray(init_image(), np.int16)
    r = client.post("/sdapi/v1/img2img", json=inpaint_body())
    assert r.status_code == 200, r.text
    out = pixels(r.json()["images"][0])
    assert r.json()["parameters"]["mask"] is None
    assert json.loads(r.json()["info"])["inpainting"] is True
    assert np.array_equal(out[:, SIZE // 2 + 8 :], original[:, SIZE // 2 + 8 :])
    assert np.abs(out[:, : SIZE // 2 - 8] - original[:, : SIZE // 2 - 8]).mean() > 10
    # inverted: the other half is kept
    r = client.post("/sdapi/v1/img2img", json=inpaint_body(inpainting_mask_invert=1))
    out = pixels(r.json()["images"][0])
    assert np.array_equal(out[:, : SIZE // 2 - 8], original[:, : SIZE // 2 - 8])
    assert np.abs(out[:, SIZE // 2 + 8 :] - original[:, SIZE // 2 + 8 :]).mean() > 10


def test_a1111_only_masked_fill_and_blur(client):
    original = np.asarray(init_image(), np.int16)
    small = np.zeros((SIZE, SIZE), np.uint8)
    small[40:72, 40:72] = 255
    body = inpaint_body(
        mask=png_b64(Image.fromarray(small)), inpaint_full_res=True, inpaint_full_res_padding=8,
        inpainting_fill=0, denoising_strength=0.75, mask_blur=4,
    )  # fmt: skip
    r = client.post("/sdapi/v1/img2img", json=body)
    assert r.status_code == 200, r.text
    out = pixels(r.json()["images"][0])
    assert out.shape == original.shape
    far = np.ones((SIZE, SIZE), bool)
    far[20:92, 20:92] = False  # beyond the box, its padding and the feather
    assert np.array_equal(out[far], original[far])
    assert np.abs(out[48:64, 48:64] - original[48:64, 48:64]).mean() > 5
    # black-and-white masks sent as RGBA and at another size work too
    rgba = Image.fromarray(small).convert("RGBA").resize((64, 64))
    assert client.post("/sdapi/v1/img2img", json={**body, "mask": png_b64(rgba)}).status_code == 200


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"inpainting_fill": 2, "denoising_strength": 0.5}, "inpainting_fill"),
        ({"inpainting_fill": 7}, "inpainting_fill"),
        ({"mask_blur": None, "mask_blur_x": 4, "mask_blur_y": 8}, "mask_blur_x"),
        ({"mask_blur": -1}, "mask_blur"),
        ({"inpaint_full_res_padding": -4}, "inpaint_full_res_padding"),
        ({"inpainting_mask_invert": 2}, "inpainting_mask_invert"),
        ({"mask": "not base64!"}, "mask"),
        ({"mask": png_b64(Image.new("L", (SIZE, SIZE), 0))}, "mask"),
        ({"latent_mask": png_b64(half_mask())}, "latent_mask"),
    ],
)
def test_a1111_inpainting_fields_that_cannot_be_honoured_are_refused(client, overrides, field):
    refused(client.post("/sdapi/v1/img2img", json=inpaint_body(**overrides)), field)


def test_native_jobs_take_a_mask(client):
    original = np.asarray(init_image(), np.int16)
    body = {
        "prompt": PROMPT, "init_image": png_b64(init_image()), "mask": png_b64(half_mask()),
        "denoise": 1.0, "steps": 4, "width": SIZE, "height": SIZE, "seed": 2,
        "inpaint": {"mask_blur": 0.0},
    }  # fmt: skip
    r = client.post("/v1/jobs", json=body)
    assert r.status_code == 202, r.text
    job = wait_job(client, r.json()["id"])
    assert job["state"] == "done", job
    assert job["settings"]["inpaint"]["mask_blur"] == 0.0
    image = client.get(job["images"][0]["url"])
    out = np.asarray(Image.open(io.BytesIO(image.content)).convert("RGB"), np.int16)
    assert np.array_equal(out[:, SIZE // 2 + 8 :], original[:, SIZE // 2 + 8 :])
    refused(client.post("/v1/jobs", json={**body, "init_image": None}), "mask")
    refused(client.post("/v1/jobs", json={**body, "inpaint": {"crop": -1}}), "mask")
    refused(client.post("/v1/jobs", json={**body, "inpaint": {"mask": "x"}}), "mask")


def generate_a1111(client, prompt: str) -> np.ndarray:
    body = {"prompt": prompt, "seed": 9, "steps": 4, "width": SIZE, "height": SIZE,
            "sampler_name": "Euler", "cfg_scale": 2.0}  # fmt: skip
    r = client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def test_loras_by_name_from_a1111_prompt_tags_and_native_jobs(client):
    listed = client.get("/sdapi/v1/loras").json()
    assert [(lo["name"], lo["path"]) for lo in listed] == [("strong", "strong.safetensors")]
    assert client.get("/v1/info").json()["features"]["loras"] == ["strong"]
    plain = generate_a1111(client, PROMPT)
    tagged = generate_a1111(client, f"<lora:strong:0.8> {PROMPT}")
    zero = generate_a1111(client, f"{PROMPT} <lora:strong:0>")
    assert np.array_equal(pixels(zero["images"][0]), pixels(plain["images"][0]))
    assert np.abs(pixels(tagged["images"][0]) - pixels(plain["images"][0])).mean() > 2
    info = json.loads(tagged["info"])
    assert info["prompt"] == PROMPT
    assert "<lora:strong:0.8>" in decode_png(tagged["images"][0]).text["parameters"]
    stored = json.loads(decode_png(tagged["images"][0]).text["sd3"])
    assert [(lo["name"], lo["scale"]) for lo in stored["files"]["loras"]] == [
        ("strong.safetensors", 0.8)
    ]
    # the native job with the same LoRA by name makes the same image
    body = {"prompt": PROMPT, "seed": 9, "steps": 4, "width": SIZE, "height": SIZE,
            "sampler": "euler", "cfg": 2.0, "loras": {"strong": 0.8}}  # fmt: skip
    job = wait_job(client, client.post("/v1/jobs", json=body).json()["id"])
    assert job["state"] == "done" and job["loras"] == {"strong": 0.8}
    native = client.get(job["images"][0]["url"]).content
    assert np.array_equal(
        np.asarray(Image.open(io.BytesIO(native)).convert("RGB"), np.int16),
        pixels(tagged["images"][0]),
    )
    # a name the server does not have, a path, a bad strength: one 422 each
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "<lora:missing:1> x", "steps": 4})
    refused(r, "prompt")
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "<lora:strong:0.5:0.2> x", "steps": 4})
    refused(r, "prompt")
    for loras in ({"../loras/strong": 1.0}, {"/etc/passwd": 1.0}, {"strong": 1e9}):
        refused(client.post("/v1/jobs", json={"prompt": "x", "loras": loras}), "loras")


def image_of(client, job) -> np.ndarray:
    content = client.get(job["images"][0]["url"]).content
    return np.asarray(Image.open(io.BytesIO(content)).convert("RGB"), np.int16)


def control_image() -> Image.Image:
    a = np.zeros((SIZE, SIZE, 3), np.uint8)
    a[32:96, 32:96] = 255
    return Image.fromarray(a)


def test_controlnets_by_name_from_a1111_units_and_native_jobs(client):
    assert client.get("/v1/info").json()["features"]["controlnets"] == ["edges"]
    base = {"prompt": PROMPT, "seed": 4, "steps": 4, "width": SIZE, "height": SIZE,
            "sampler": "euler", "cfg": 2.0}  # fmt: skip
    plain = wait_job(client, client.post("/v1/jobs", json=base).json()["id"])
    control = {"name": "edges", "image": png_b64(control_image()), "strength": 0.8,
               "preprocess": "canny"}  # fmt: skip
    r = client.post("/v1/jobs", json={**base, "controls": [control]})
    assert r.status_code == 202, r.text
    controlled = wait_job(client, r.json()["id"])
    assert controlled["state"] == "done" and controlled["controlnets"] == ["edges"]
    assert np.abs(image_of(client, controlled) - image_of(client, plain)).mean() > 1
    stored = json.loads(
        Image.open(io.BytesIO(client.get(controlled["images"][0]["url"]).content)).text["sd3"]
    )
    assert [c["name"] for c in stored["files"]["controlnet"]] == ["edges.safetensors"]
    assert stored["settings"]["controls"][0]["strength"] == 0.8
    assert stored["settings"]["controls"][0]["preprocess"]["kind"] == "canny"
    # the next job without a ControlNet is the plain image again
    again = wait_job(client, client.post("/v1/jobs", json=base).json()["id"])
    assert np.array_equal(image_of(client, again), image_of(client, plain))
    # A1111's ControlNet extension unit: the same image
    unit = {"enabled": True, "model": "edges [0123abcd]", "image": png_b64(control_image()),
            "module": "canny", "weight": 0.8, "guidance_start": 0.0, "guidance_end": 1.0,
            "threshold_a": 100, "threshold_b": 200, "control_mode": 0}  # fmt: skip
    body = {"prompt": PROMPT, "seed": 4, "steps": 4, "width": SIZE, "height": SIZE,
            "sampler_name": "Euler", "cfg_scale": 2.0,
            "alwayson_scripts": {"ControlNet": {"args": [unit, {"enabled": False}]}}}  # fmt: skip
    r = client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    assert np.array_equal(pixels(r.json()["images"][0]), image_of(client, controlled))
    # refused by name: unknown ControlNets, preprocessors, ranges, other scripts
    for bad in ({**unit, "model": "other"}, {**unit, "module": "openpose"},
                {**unit, "control_mode": 2}, {**unit, "image": None}):  # fmt: skip
        scripts = {"controlnet": {"args": [bad]}}
        refused(client.post("/sdapi/v1/txt2img", json={**body, "alwayson_scripts": scripts}),
                "alwayson_scripts")  # fmt: skip
    for bad in ({**control, "name": "../edges"}, {**control, "start": 0.9, "end": 0.1},
                {**control, "preprocess": "depth"}, {**control, "image": "x"}):  # fmt: skip
        refused(client.post("/v1/jobs", json={**base, "controls": [bad]}), "controls")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--lora-dir", "missing"], "--lora-dir missing: no such folder"),
        (["--lora-dir", "."], "no .safetensors files"),
        (["--controlnet", "missing.safetensors"], "--controlnet missing.safetensors: no such"),
    ],
)
def test_lora_and_controlnet_options_are_checked_before_loading(tmp_path, args, message):
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(
        [sys.executable, "-m", "sd3", "serve", "--port", "0", *args],
        cwd=tmp_path, capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert done.returncode != 0 and message in done.stderr, done.stderr
