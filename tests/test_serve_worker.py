"""The server's parts in one process, where a test can reach inside: the worker keeps going
when a job fails (alone or in a shared batch), cancels and shutdown stop at the next step, the
preview map tracks the decoded image, the history pages and searches, and A1111's infotext
is read back as A1111 reads it."""

import time
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from sd3 import metadata
from sd3.cli import DEFAULT_MODEL, open_pipeline
from sd3.serve import preview
from sd3.serve.history import History
from sd3.serve.jobs import CANCELLED, DONE, FAILED, ShuttingDown
from sd3.serve.service import Limits, Service


@pytest.fixture(scope="module")
def pipe():
    files = {"model": str(DEFAULT_MODEL)}
    pipe = open_pipeline(files, torch.device("cpu"))
    pipe.load()
    return pipe, files


@pytest.fixture
def service(pipe, tmp_path):
    pipe, files = pipe
    defaults = pipe.settings("", steps=4)
    service = Service(pipe, dict(files), defaults, tmp_path, Limits(max_queue=8), None, 0.0)
    service.start()
    yield service
    service.close(timeout=30)


def wait_ended(jobs, timeout=120.0):
    deadline = time.monotonic() + timeout
    while not all(job.ended for job in jobs):
        assert time.monotonic() < deadline, [job.state for job in jobs]
        time.sleep(0.02)


def hold(service):
    """A job that keeps the worker busy, so the next ones queue up together."""
    job = service.new_job({"prompt": "hold", "steps": 150})
    service.queue.submit(job)
    deadline = time.monotonic() + 60
    while job.step == 0:
        assert time.monotonic() < deadline, job.state
        time.sleep(0.01)
    return job


def test_a_job_that_fails_in_a_shared_batch_fails_alone(service, monkeypatch):
    generate = service.pipe.generate
    calls = []

    def failing(s, init_image=None, callback=None, mask_image=None, control_images=(), **batch):
        calls.append(s.num_images if batch else s.prompt)
        if s.prompt == "boom" or (batch and s.num_images == 3):
            raise RuntimeError("the model fell over")
        return generate(s, init_image, callback, mask_image, control_images, **batch)

    blocker = hold(service)
    jobs = [service.new_job({"prompt": p}) for p in ("boom", "fine", "also fine")]
    for job in jobs:
        service.queue.submit(job)
    monkeypatch.setattr(service.pipe, "generate", failing)
    service.queue.cancel(blocker)
    wait_ended(jobs)
    assert [job.state for job in jobs] == [FAILED, DONE, DONE]
    assert jobs[0].error == "the model fell over"
    assert calls[0] == 3  # the shared batch first, then each alone
    assert calls[1:] == ["boom", "fine", "also fine"]
    for job in jobs[1:]:
        assert (service.outputs / job.images[0]["name"]).is_file()
    # the worker goes on, and the history knows all three
    after = service.new_job({"prompt": "after"})
    service.queue.submit(after)
    wait_ended([after])
    assert after.state == DONE
    assert service.history.job(jobs[0].id)["error"] == "the model fell over"


def test_cancelling_one_job_of_a_shared_batch_keeps_the_others(service):
    blocker = hold(service)
    jobs = [service.new_job({"prompt": p, "steps": 40}) for p in ("a", "b")]
    for job in jobs:
        service.queue.submit(job)
    service.queue.cancel(blocker)
    while jobs[0].step < 2:
        time.sleep(0.01)
    service.queue.cancel(jobs[0])
    wait_ended(jobs)
    assert [job.state for job in jobs] == [CANCELLED, DONE]
    assert jobs[0].step < 40 and jobs[1].timings["batch_jobs"] == 2


def test_shutdown_cancels_the_queue_and_stops_the_running_job(service):
    running = hold(service)
    queued = service.new_job({"prompt": "never"})
    service.queue.submit(queued)
    service.shutdown()  # grace 0: the running job stops at its next step
    wait_ended([running, queued], timeout=30)
    assert running.state == CANCELLED and running.step < 150
    assert queued.state == CANCELLED and "shut down" in queued.error
    with pytest.raises(ShuttingDown):
        service.queue.submit(service.new_job({"prompt": "late"}))


def test_batch_keys_group_only_what_makes_the_same_images(service):
    key = service.new_job({"prompt": "a red circle"}).batch_key
    assert key == service.new_job({"prompt": "something else", "seed": 3}).batch_key
    for change in ({"steps": 5}, {"cfg": 3.0}, {"width": 144}, {"shift": 2.0}, {"t5_length": 30}):
        assert service.new_job({"prompt": "a red circle", **change}).batch_key != key, change
    # samplers that draw noise batch too (each image draws its own), with their own kind; img2img
    # and inpainting run alone
    ancestral = service.new_job({"prompt": "x", "sampler": "euler_ancestral"}).batch_key
    assert ancestral is not None and ancestral != key
    init = Image.new("RGB", (128, 128))
    assert service.new_job({"prompt": "x", "denoise": 0.5}, init_image=init).batch_key is None
    mask = Image.new("L", (128, 128), 255)
    masked = service.new_job({"prompt": "x", "inpaint": {}}, init_image=init, mask=mask)
    assert masked.batch_key is None and masked.settings.inpaint is not None


def test_the_preview_map_follows_the_decoder(pipe):
    pipe, _ = pipe
    fitted = preview.fit(pipe.vae, pipe.device, pipe.dtype)
    s = replace(pipe.settings("a red circle above a blue square"), seed=4)
    latents, images = pipe.generate(s)
    decoded = torch.from_numpy(np.asarray(images[0], np.float32) / 127.5 - 1).permute(2, 0, 1)
    target = F.avg_pool2d(decoded[None], 8)[0]
    error = (fitted.rgb(latents[0]) - target).abs().mean()
    constant = (target - target.mean(dim=(1, 2), keepdim=True)).abs().mean()
    # better than each channel's mean colour (the bundled model's VAE gives about 0.77)
    assert error < 0.85 * constant, (error, constant)
    png = fitted.png(latents[0])
    assert png.startswith(b"\x89PNG")


def test_history_pages_and_searches_with_literal_wildcards(tmp_path):
    history = History(tmp_path)
    base = {"negative_prompt": "", "width": 8, "height": 8}
    for i, prompt in enumerate(["a 100% red circle", "a blue_square", "a red square"]):
        settings = {**base, "prompt": prompt, "seed": i}
        job = {"id": f"j{i}", "state": "done", "source": "native", "created": i, "started": i,
               "finished": i, "settings": settings, "error": None, "timings": {}}  # fmt: skip
        history.record(job, [{"name": f"i{i}.png", "settings": settings, "model": "m"}])
    assert history.images(10, 0, "100%")[0] == 1
    assert history.images(10, 0, "blue_")[0] == 1 and history.images(10, 0, "e_s")[0] == 1
    assert history.images(10, 0, "%")[0] == 1
    total, items = history.images(1, 1, "red")
    assert total == 2 and [i["name"] for i in items] == ["i0.png"]
    assert history.has_image("i1.png") and not history.has_image("../i1.png")
    history.close()
    reopened = History(tmp_path)
    assert reopened.images(10)[0] == 3 and reopened.job("j2")["settings"]["seed"] == 2
    reopened.close()


def test_a1111_infotext_reads_back_as_a1111_reads_it():
    text = (
        'a cat, "quoted"\nsecond line\nNegative prompt: ugly, blurry\nmore negative\n'
        "Steps: 20, Sampler: DPM++ 2M, CFG scale: 7, Seed: 1234, Size: 512x768, "
        'Lora hashes: "a: 1, b: 2", Denoising strength: 0.5, Version: v1.9'
    )
    found = metadata.parse_parameters(text)
    assert found["prompt"] == 'a cat, "quoted"\nsecond line'
    assert found["negative_prompt"] == "ugly, blurry\nmore negative"
    assert found["Lora hashes"] == "a: 1, b: 2" and found["Version"] == "v1.9"
    settings, left_out = metadata.settings_from_parameters(text)
    assert settings == {
        "prompt": 'a cat, "quoted"\nsecond line', "negative_prompt": "ugly, blurry\nmore negative",
        "steps": 20, "sampler": "dpmpp_2m", "cfg": 7.0, "seed": 1234, "width": 512,
        "height": 768, "denoise": 0.5,
    }  # fmt: skip
    assert left_out == ["Lora hashes", "Version"]
    assert metadata.settings_from_parameters("only a prompt") == (
        {"prompt": "only a prompt", "negative_prompt": ""}, []
    )  # fmt: skip
    assert metadata.settings_from_parameters("x\nSteps: many, Seed: 1, Sampler: LMS")[1] == [
        "Steps", "Sampler"
    ]  # fmt: skip
    for name, ours in (
        ("Euler a", "euler_ancestral"),
        ("k_heun", "heun"),
        ("dpm++ 2m sde", "dpmpp_2m_sde"),
    ):
        assert metadata.sampler_named(name) == ours
    assert metadata.sampler_named("DDIM") is None
