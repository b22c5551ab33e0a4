"""`sd3 serve` over HTTP: a real server process on 127.0.0.1 with the bundled model, driven
through an HTTP client: the A1111 endpoints with A1111's field names and types, the native
jobs, progress events, cancel, the queue's 429, batching, every limit, path traversal and
malformed input (one 4xx each, the server still serving), auth, CORS, SIGTERM and restart."""

import base64
import io
import json
import struct
import time
import zlib

import httpx
import numpy as np
import pytest
from PIL import Image, PngImagePlugin
from serve_helpers import ServerProcess, decode_png, png_b64, wait_job

PROMPT = "a red circle above a blue square"
LIMITS = [
    "--steps", "4", "--max-width", "256", "--max-height", "256", "--max-steps", "200",
    "--max-batch", "4", "--max-queue", "2", "--batch-limit", "4", "--max-body", "2000000",
    "--max-image-pixels", "262144", "--shutdown-grace", "5",
]  # fmt: skip
SLOW = 200  # steps of a job that keeps the worker busy until cancelled


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    process = ServerProcess(tmp_path_factory.mktemp("serve"), *LIMITS)
    yield process
    assert process.stop() == 0, process.log()


@pytest.fixture
def client(server):
    with server.client() as c:
        yield c
        assert c.get("/v1/health").json()["status"] == "ok"  # still serving
        cancel_all(c)


def cancel_all(client):
    jobs = client.get("/v1/jobs").json()
    for job in jobs["running"] + jobs["queued"]:
        client.delete(f"/v1/jobs/{job['id']}")
    for job in jobs["running"] + jobs["queued"]:
        wait_job(client, job["id"])


def refused(response, status: int, field: str | None = None) -> str:
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    text = json.dumps(detail)
    if field is not None:
        assert any(field in map(str, d.get("loc", [])) for d in detail) or field in text, text
    return text


def busy(client) -> str:
    """A running job that keeps the worker busy until it is cancelled."""
    job = client.post("/v1/jobs", json={"prompt": "busy", "steps": SLOW}).json()
    wait_job(client, job["id"], until=("running",))
    return job["id"]


# --- the A1111 API ------------------------------------------------------------------------------


def a1111_request(**overrides) -> dict:
    """What A1111 clients send: every common field, most at A1111's defaults."""
    return {
        "prompt": PROMPT, "negative_prompt": "", "styles": [], "seed": 42, "subseed": -1,
        "subseed_strength": 0, "seed_resize_from_h": -1, "seed_resize_from_w": -1,
        "sampler_name": "Euler", "batch_size": 2, "n_iter": 1, "steps": 4, "cfg_scale": 2.0,
        "width": 128, "height": 128, "restore_faces": False, "tiling": False,
        "do_not_save_samples": False, "do_not_save_grid": False, "eta": 0, "s_churn": 0,
        "s_tmax": None, "s_tmin": 0, "s_noise": 1, "override_settings": {},
        "override_settings_restore_afterwards": True, "script_args": [], "sampler_index": "Euler",
        "script_name": None, "send_images": True, "save_images": False, "alwayson_scripts": {},
        "enable_hr": False, "denoising_strength": 0, "hr_scale": 2, "hr_upscaler": "Latent",
        "some_future_field": 1, **overrides,
    }  # fmt: skip


def test_a1111_txt2img_answers_as_a1111_does(client, server):
    title = client.get("/sdapi/v1/sd-models").json()[0]["title"]
    r = client.post(
        "/sdapi/v1/txt2img",
        json=a1111_request(override_settings={"sd_model_checkpoint": title}),
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"images", "parameters", "info"}
    assert len(body["images"]) == 2 and all(isinstance(i, str) for i in body["images"])
    image = decode_png(body["images"][0])
    assert image.size == (128, 128)
    assert image.text["parameters"].startswith(PROMPT) and "Seed: 42" in image.text["parameters"]
    assert json.loads(image.text["sd3"])["settings"]["seed"] == 42
    assert decode_png(body["images"][1]).text["parameters"].count("Seed: 43") == 1
    assert body["parameters"]["prompt"] == PROMPT and body["parameters"]["seed"] == 42
    info = json.loads(body["info"])  # a JSON string, as A1111's
    assert isinstance(body["info"], str)
    assert info["all_seeds"] == [42, 43] and info["seed"] == 42
    assert info["sampler_name"] == "Euler" and info["steps"] == 4 and info["cfg_scale"] == 2.0
    assert (info["width"], info["height"]) == (128, 128)
    assert info["sd_model_hash"] == title.split("[")[1].rstrip("]")
    assert len(info["infotexts"]) == 2 and "Seed: 43" in info["infotexts"][1]
    assert info["ignored_fields"] == ["some_future_field"]
    # the images are in the outputs folder and the history
    for name in info["sd3"]["images"]:
        assert (server.outputs / name).is_file()
        assert client.get(f"/v1/images/{name}").content == base64.b64decode(
            body["images"][info["sd3"]["images"].index(name)]
        )
    # the same request again gives the same pixels (the same batch: a CPU's sums may group
    # differently by batch size); send_images false sends none
    again = client.post("/sdapi/v1/txt2img", json=a1111_request()).json()
    for ours, theirs in zip(again["images"], body["images"], strict=True):
        assert np.array_equal(np.asarray(decode_png(ours)), np.asarray(decode_png(theirs)))
    quiet = client.post("/sdapi/v1/txt2img", json=a1111_request(batch_size=1, send_images=False))
    assert quiet.status_code == 200 and quiet.json()["images"] == []


def test_a1111_sampler_names_map_to_sd3s(client):
    names = {s["name"]: s for s in client.get("/sdapi/v1/samplers").json()}
    assert {"Euler", "Euler a", "Heun", "DPM++ 2M", "DPM++ 2M SDE"} <= set(names)
    assert all(set(s) == {"name", "aliases", "options"} for s in names.values())
    ours = client.post(
        "/v1/jobs",
        json={"prompt": PROMPT, "sampler": "dpmpp_2m", "seed": 7, "steps": 4, "cfg": 2.0},
    ).json()
    theirs = client.post(
        "/sdapi/v1/txt2img",
        json={"prompt": PROMPT, "sampler_name": "DPM++ 2M", "seed": 7, "steps": 4,
              "cfg_scale": 2, "width": 128, "height": 128},
    )  # fmt: skip
    assert theirs.status_code == 200, theirs.text
    done = wait_job(client, ours["id"])
    mine = Image.open(io.BytesIO(client.get(done["images"][0]["url"]).content))
    assert np.array_equal(np.asarray(mine), np.asarray(decode_png(theirs.json()["images"][0])))
    # legacy sampler_index, any case, k_ aliases
    for name in ("euler a", "k_dpmpp_2m_sde", "HEUN"):
        r = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "sampler_index": name,
                                                   "steps": 2, "send_images": False})  # fmt: skip
        assert r.status_code == 200, r.text


def test_a1111_img2img(client):
    init = Image.new("RGB", (128, 128), (200, 30, 30))
    body = {"init_images": [png_b64(init)], "denoising_strength": 0.5, "steps": 4,
            "prompt": PROMPT, "seed": 3, "include_init_images": False}  # fmt: skip
    r = client.post("/sdapi/v1/img2img", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["parameters"]["init_images"] is None
    info = json.loads(r.json()["info"])
    assert info["denoising_strength"] == 0.5
    assert "Denoising strength: 0.5" in decode_png(r.json()["images"][0]).text["parameters"]
    # a data: URL, a JPEG, and a larger image resized to the requested size
    jpeg = png_b64(Image.new("RGB", (300, 200), (0, 90, 200)), format="JPEG")
    body.update(init_images=["data:image/jpeg;base64," + jpeg], width=128, height=128)
    assert client.post("/sdapi/v1/img2img", json=body).status_code == 200
    refused(client.post("/sdapi/v1/img2img", json={"prompt": "x"}), 422, "init_images")
    latent_masked = {**body, "latent_mask": png_b64(Image.new("L", (128, 128), 255))}
    refused(client.post("/sdapi/v1/img2img", json=latent_masked), 422, "latent_mask")
    refused(client.post("/sdapi/v1/img2img", json={**body, "resize_mode": 1}), 422, "resize_mode")


@pytest.mark.parametrize(
    "field, value",
    [
        ("enable_hr", True),
        ("restore_faces", True),
        ("tiling", True),
        ("subseed_strength", 0.5),
        ("styles", ["a style"]),
        ("script_name", "x/y/z plot"),
        ("alwayson_scripts", {"adetailer": {"args": []}}),
        ("sampler_name", "DPM++ SDE Karras"),
        ("scheduler", "karras"),
        ("override_settings", {"sd_model_checkpoint": "sd_xl_base_1.0.safetensors"}),
        ("override_settings", {"CLIP_stop_at_last_layers": 2}),
        ("s_churn", 1.0),
        ("batch_size", 5),
        ("width", 512),
    ],
)
def test_a1111_fields_sd3_cannot_follow_are_refused_by_name(client, field, value):
    text = refused(client.post("/sdapi/v1/txt2img", json=a1111_request(**{field: value})), 422)
    assert field.split(".")[0] in text, text


def test_a1111_listings_and_options(client):
    model = client.get("/sdapi/v1/sd-models").json()
    assert len(model) == 1 and set(model[0]) == {
        "title", "model_name", "hash", "sha256", "filename", "config"
    }  # fmt: skip
    assert model[0]["filename"] == "sd3_shapes.safetensors"  # a name, never a server path
    assert model[0]["title"] == f"sd3_shapes.safetensors [{model[0]['hash']}]"
    schedulers = client.get("/sdapi/v1/schedulers").json()
    assert schedulers[0]["name"] == "simple"
    options = client.get("/sdapi/v1/options").json()
    assert options["sd_model_checkpoint"] == model[0]["title"]
    assert options["samples_format"] == "png"
    assert (
        client.post(
            "/sdapi/v1/options", json={"sd_model_checkpoint": model[0]["title"]}
        ).status_code
        == 200
    )
    refused(
        client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "other"}),
        422,
        "sd_model_checkpoint",
    )
    refused(client.post("/sdapi/v1/options", json={"samples_format": "jpg"}), 422, "samples_format")
    refused(client.post("/sdapi/v1/options", json={"no_such_option": 1}), 422, "no_such_option")
    assert client.get("/sdapi/v1/loras").json() == []


def test_a1111_progress_with_preview_and_interrupt(client):
    idle = client.get("/sdapi/v1/progress").json()
    assert idle["progress"] == 0 and idle["state"]["job_count"] == 0
    job_id = busy(client)
    deadline = time.monotonic() + 60
    while (p := client.get("/sdapi/v1/progress").json())["state"]["sampling_step"] < 2:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert 0 < p["progress"] < 1 and p["eta_relative"] > 0
    assert set(p["state"]) >= {"skipped", "interrupted", "job", "job_count", "job_timestamp",
                               "job_no", "sampling_step", "sampling_steps"}  # fmt: skip
    assert p["state"]["sampling_steps"] == SLOW and p["state"]["job_count"] == 1
    preview = decode_png(p["current_image"])
    assert preview.size[0] >= 128
    skipped = client.get("/sdapi/v1/progress", params={"skip_current_image": True}).json()
    assert skipped["current_image"] is None
    assert client.post("/sdapi/v1/interrupt").status_code == 200
    job = wait_job(client, job_id, timeout=10)
    assert job["state"] == "cancelled" and job["step"] < SLOW


def a1111_png() -> str:
    info = PngImagePlugin.PngInfo()
    info.add_text(
        "parameters",
        "a green triangle\nNegative prompt: blurry\nSteps: 12, Sampler: Euler a, "
        'Schedule type: Karras, CFG scale: 3.5, Seed: 99, Size: 128x128, Lora hashes: "a: 1, b: 2"',
    )
    return png_b64(Image.new("RGB", (64, 64)), pnginfo=info)


def test_png_info_reads_sd3_and_a1111_pngs(client):
    r = client.post("/sdapi/v1/txt2img", json=a1111_request(batch_size=1, seed=5))
    ours = r.json()["images"][0]
    a1111 = client.post("/sdapi/v1/png-info", json={"image": ours}).json()
    assert a1111["info"].startswith(PROMPT) and a1111["parameters"]["Seed"] == "5"
    native = client.post("/v1/png-info", json={"image": "data:image/png;base64," + ours}).json()
    assert native["source"] == "sd3" and native["settings"]["seed"] == 5
    assert native["model"] == "sd3_shapes.safetensors"
    theirs = client.post("/v1/png-info", json={"image": a1111_png()}).json()
    assert theirs["source"] == "a1111"
    assert theirs["settings"] == {
        "prompt": "a green triangle", "negative_prompt": "blurry", "steps": 12,
        "sampler": "euler_ancestral", "cfg": 3.5, "seed": 99, "width": 128, "height": 128,
    }  # fmt: skip
    assert theirs["left_out"] == ["Schedule type", "Lora hashes"]
    refused(
        client.post("/v1/png-info", json={"image": png_b64(Image.new("RGB", (8, 8)))}), 422, "image"
    )
    jpeg = png_b64(Image.new("RGB", (8, 8)), format="JPEG")
    refused(client.post("/v1/png-info", json={"image": jpeg}), 422, "image")
    # a tampered sd3 chunk: one error naming the field
    bad = PngImagePlugin.PngInfo()
    bad.add_text("sd3", json.dumps({"settings": {"prompt": 1}, "files": {}}))
    text = refused(
        client.post("/v1/png-info", json={"image": png_b64(Image.new("RGB", (8, 8)), pnginfo=bad)}),
        422,
    )
    assert "settings" in text


# --- the native API ---------------------------------------------------------------------------


def read_events(client, job_id: str) -> list[tuple[str, dict]]:
    events = []
    with client.stream("GET", f"/v1/jobs/{job_id}/events") as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        name = None
        for line in r.iter_lines():
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                events.append((name, json.loads(line[5:])))
    return events


def test_native_job_progress_events_result_and_history(client, server):
    r = client.post("/v1/jobs", json={"prompt": "a blue square", "steps": 12, "seed": 11,
                                      "num_images": 2, "sampler": "heun"})  # fmt: skip
    assert r.status_code == 202, r.text
    job = r.json()
    assert r.headers["location"] == f"/v1/jobs/{job['id']}"
    assert job["state"] in ("queued", "running") and job["settings"]["seed"] == 11
    events = read_events(client, job["id"])
    names = [name for name, _ in events]
    assert names[-1] == "done" and set(names[:-1]) == {"progress"}
    steps = [e["step"] for name, e in events if name == "progress"]
    assert steps == sorted(steps) and steps[-1] == 12
    previews = [e for name, e in events if "preview" in e]
    assert previews and previews[-1]["preview"].startswith("data:image/png;base64,")
    done = events[-1][1]
    assert done["progress"] == 1.0 and len(done["images"]) == 2
    assert [i["seed"] for i in done["images"]] == [11, 12]
    for key in ("queued", "denoise", "decode", "total", "batch_images"):
        assert key in done["timings"]
    png = client.get(done["images"][1]["url"])
    assert png.headers["content-type"] == "image/png"
    assert json.loads(Image.open(io.BytesIO(png.content)).text["sd3"])["settings"]["seed"] == 12
    assert client.get(f"/v1/jobs/{job['id']}").json()["state"] == "done"
    # the events of an ended job: its end at once
    assert [n for n, _ in read_events(client, job["id"])] == ["done"]
    # history: newest first, paged, searched
    page = client.get("/v1/history", params={"limit": 1, "q": "blue square"}).json()
    assert page["total"] >= 2 and len(page["items"]) == 1
    assert page["items"][0]["name"] == done["images"][1]["name"]
    second = client.get("/v1/history", params={"limit": 1, "offset": 1, "q": "blue square"}).json()
    assert second["items"][0]["seed"] == 11
    assert client.get("/v1/history", params={"q": "no such prompt %_"}).json()["total"] == 0
    info = client.get("/v1/info").json()
    assert info["defaults"]["steps"] == 4 and info["limits"]["max_batch"] == 4


def test_native_img2img_and_random_seeds(client):
    init = png_b64(Image.new("RGB", (128, 128), (30, 200, 30)))
    job = client.post("/v1/jobs", json={"prompt": PROMPT, "init_image": init, "steps": 5}).json()
    done = wait_job(client, job["id"])
    assert done["state"] == "done" and done["settings"]["denoise"] == 0.6
    a = client.post("/v1/jobs", json={"prompt": "x", "seed": -1}).json()["settings"]["seed"]
    b = client.post("/v1/jobs", json={"prompt": "x"}).json()["settings"]["seed"]
    assert a != b and 0 <= a < 2**32


BOMB_SIDE = 100_000


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims a huge image: refused before any pixel is decoded."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    "body, field",
    [
        ({"prompt": PROMPT, "loras": [{"name": "x"}]}, "loras"),
        ({"prompt": PROMPT, "steps": "many"}, "steps"),
        ({"prompt": PROMPT, "steps": 4.5}, "steps"),
        ({"prompt": 5}, "prompt"),
        ({"steps": 4}, "prompt"),
        ({"prompt": PROMPT, "width": 100}, "width"),
        ({"prompt": PROMPT, "width": 512}, "width"),
        ({"prompt": PROMPT, "steps": 201}, "steps"),
        ({"prompt": PROMPT, "steps": 0}, "steps"),
        ({"prompt": PROMPT, "num_images": 5}, "num_images"),
        ('{"prompt": "x", "cfg": 1e400}', "cfg"),
        ('{"prompt": "x", "shift": NaN}', "shift"),
        ({"prompt": PROMPT, "seed": 2**63}, "seed"),
        ({"prompt": PROMPT, "sampler": "ddim"}, "sampler"),
        ({"prompt": PROMPT, "model": "../../etc/passwd"}, "model"),
        ({"prompt": PROMPT, "denoise": 0.5}, "denoise"),
        ({"prompt": PROMPT, "slg": {"layers": [99], "scale": 2.0}}, "skip-layer"),
        ({"prompt": PROMPT, "init_image": "not base64!"}, "init_image"),
        (
            {"prompt": PROMPT, "init_image": base64.b64encode(b"not an image").decode()},
            "init_image",
        ),
        ({"prompt": PROMPT, "init_image": png_b64(Image.new("RGB", (1024, 1024)))}, "init_image"),
        (
            {
                "prompt": PROMPT,
                "init_image": base64.b64encode(png_header_only(BOMB_SIDE, BOMB_SIDE)).decode(),
            },
            "init_image",
        ),
        (
            {"prompt": PROMPT, "init_image": png_b64(Image.new("RGB", (8, 8)), format="GIF")},
            "init_image",
        ),
        ({"prompt": "x" * 10_001}, "prompt"),
        ({"prompt": PROMPT, "t5_length": 100_000}, "t5_length"),
    ],
)
def test_bad_native_requests_get_one_422_naming_the_field(client, body, field):
    if isinstance(body, str):  # JSON that json.dumps does not write
        r = client.post("/v1/jobs", content=body, headers={"content-type": "application/json"})
    else:
        r = client.post("/v1/jobs", json=body)
    text = refused(r, 422, field)
    assert field in text


def test_malformed_json_oversized_bodies_and_unknown_jobs(client):
    r = client.post(
        "/v1/jobs", content=b'{"prompt": "x", ', headers={"content-type": "application/json"}
    )
    assert r.status_code == 422 and "json" in r.text.lower()
    r = client.post(
        "/sdapi/v1/txt2img", content=b"\xff\xfe", headers={"content-type": "application/json"}
    )
    assert 400 <= r.status_code < 500
    r = client.post("/v1/jobs", json={"prompt": "x", "init_image": "A" * 3_000_000})
    assert r.status_code == 413
    # a body that does not say its length, streamed past the limit
    r = client.post("/v1/jobs", content=(b"x" * 65536 for _ in range(40)),
                    headers={"content-type": "application/json"})  # fmt: skip
    assert r.status_code == 413
    assert client.get("/v1/jobs/0123456789abcdef").status_code == 404
    assert client.delete("/v1/jobs/nope").status_code == 404
    assert client.get("/v1/history", params={"limit": 100000}).status_code == 422


def test_cancel_queued_and_running_jobs_and_429_when_the_queue_is_full(client):
    running = busy(client)
    queued = [client.post("/v1/jobs", json={"prompt": f"q{i}", "steps": 3}) for i in range(2)]
    assert [r.status_code for r in queued] == [202, 202]
    assert [r.json()["queue_position"] for r in queued] == [1, 2]
    full = client.post("/v1/jobs", json={"prompt": "one too many"})
    assert full.status_code == 429 and int(full.headers["retry-after"]) >= 1
    full = client.post("/sdapi/v1/txt2img", json={"prompt": "one too many"})
    assert full.status_code == 429
    # a queued job ends at once
    r = client.delete(f"/v1/jobs/{queued[1].json()['id']}")
    assert r.status_code == 200 and r.json()["state"] == "cancelled"
    # the running one at its next step
    r = client.delete(f"/v1/jobs/{running}")
    assert r.status_code in (200, 202)
    job = wait_job(client, running, timeout=10)
    assert job["state"] == "cancelled" and job["step"] < SLOW
    assert client.delete(f"/v1/jobs/{running}").status_code == 409
    # the other queued job still runs
    assert wait_job(client, queued[0].json()["id"])["state"] == "done"


@pytest.mark.parametrize("sampler", ["euler", "euler_ancestral"])
def test_compatible_jobs_share_a_batch_and_get_their_own_images(client, sampler):
    blocker = busy(client)
    # (the queue holds 2) two jobs of the same size, steps, sampler and guidance; an ancestral
    # sampler's noise is drawn per image from its own seed too
    settings = {"steps": 6, "sampler": sampler}
    jobs = [
        client.post("/v1/jobs", json={"prompt": p, "seed": s, **settings}).json()
        for p, s in (("a red circle", 1), ("a blue square below a green triangle", 2))
    ]
    client.delete(f"/v1/jobs/{blocker}")
    done = [wait_job(client, j["id"]) for j in jobs]
    assert all(d["state"] == "done" for d in done)
    assert [d["timings"]["batch_jobs"] for d in done] == [2, 2]
    assert done[0]["started"] == done[1]["started"]
    # each image is the one its request makes alone
    for d in done:
        alone = client.post("/v1/jobs", json={"prompt": d["settings"]["prompt"],
                                              "seed": d["settings"]["seed"], **settings}).json()  # fmt: skip
        alone = wait_job(client, alone["id"])
        assert alone["timings"]["batch_jobs"] == 1
        a = np.asarray(Image.open(io.BytesIO(client.get(d["images"][0]["url"]).content)), float)
        b = np.asarray(Image.open(io.BytesIO(client.get(alone["images"][0]["url"]).content)), float)
        assert np.abs(a - b).mean() < 1.0 and np.abs(a - b).max() <= 24, np.abs(a - b).max()


def test_images_are_served_by_name_only_from_the_history(client, server):
    (server.outputs / "planted.png").write_bytes(
        base64.b64decode(png_b64(Image.new("RGB", (4, 4))))
    )
    for path in (
        "/v1/images/planted.png",  # in the folder, not made by the server
        "/v1/images/history.sqlite3",
        "/v1/images/..%2Fserver.err",
        "/v1/images/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
        "/v1/images/..%5c..%5cserver.err",
        "/v1/images/%2Fetc%2Fpasswd",
        "/v1/images/.png",
    ):
        r = client.get(path)
        assert r.status_code == 404, (path, r.status_code)
    raw = httpx.get(server.url + "/v1/images/../../server.err")  # normalised by the client
    assert raw.status_code == 404


def test_a_client_that_goes_away_changes_nothing(client, server):
    job = client.post("/v1/jobs", json={"prompt": PROMPT, "steps": 30}).json()
    with client.stream("GET", f"/v1/jobs/{job['id']}/events") as r:
        next(r.iter_lines())  # read one line, then hang up
    with pytest.raises(httpx.ReadTimeout):
        with server.client(timeout=0.3) as impatient:
            impatient.post("/sdapi/v1/txt2img", json={"prompt": "left early", "steps": 20})
    assert wait_job(client, job["id"])["state"] == "done"
    page = client.get("/v1/history", params={"q": "left early"}).json()
    deadline = time.monotonic() + 30
    while page["total"] == 0 and time.monotonic() < deadline:
        time.sleep(0.1)
        page = client.get("/v1/history", params={"q": "left early"}).json()
    assert page["total"] == 1


def test_docs_and_the_page_are_served_offline(client):
    docs = client.get("/docs")
    assert docs.status_code == 200 and "/docs-static/swagger-ui-bundle.js" in docs.text
    assert "cdn" not in docs.text.lower()
    assert client.get("/docs-static/swagger-ui-bundle.js").status_code == 200
    schema = client.get("/openapi.json").json()
    assert {"/sdapi/v1/txt2img", "/sdapi/v1/img2img", "/v1/jobs", "/v1/history"} <= set(
        schema["paths"]
    )
    page = client.get("/")
    assert (
        page.status_code == 200 and "default-src 'self'" in page.headers["content-security-policy"]
    )
    for asset in ("/static/page.js", "/static/page.css"):
        text = client.get(asset).text
        assert "http://" not in text and "https://" not in text
    assert (
        "access-control-allow-origin"
        not in client.get("/v1/health", headers={"Origin": "http://elsewhere.test"}).headers
    )


# --- its own processes: auth, CORS, binding, SIGTERM and restart -----------------------------


def test_an_api_key_guards_everything_but_the_page(tmp_path):
    key = "correct horse battery staple"
    server = ServerProcess(
        tmp_path, "--api-key", key, "--cors", "http://page.test", "--no-previews"
    )
    try:
        with server.client() as c:
            r = c.get("/v1/info")
            assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
            assert (
                c.get("/sdapi/v1/sd-models", headers={"Authorization": "Bearer wrong"}).status_code
                == 401
            )
            assert c.post("/v1/jobs", json={"prompt": "x"}).status_code == 401
            assert c.get("/v1/images/x.png").status_code == 401
            good = {"Authorization": f"Bearer {key}"}
            assert c.get("/v1/info", headers=good).status_code == 200
            basic = base64.b64encode(f"user:{key}".encode()).decode()  # A1111 clients' --api-auth
            assert (
                c.get("/sdapi/v1/options", headers={"Authorization": f"Basic {basic}"}).status_code
                == 200
            )
            for public in ("/", "/static/page.js", "/v1/health", "/docs", "/openapi.json"):
                assert c.get(public).status_code == 200, public
            # CORS for the named origin only, preflight included
            r = c.options("/v1/jobs", headers={"Origin": "http://page.test",
                                               "Access-Control-Request-Method": "POST",
                                               "Access-Control-Request-Headers": "authorization"})  # fmt: skip
            assert r.headers["access-control-allow-origin"] == "http://page.test"
            r = c.get("/v1/info", headers={**good, "Origin": "http://other.test"})
            assert "access-control-allow-origin" not in r.headers
    finally:
        assert server.stop() == 0


@pytest.mark.parametrize("args", [["--listen"], ["--host", "0.0.0.0"], ["--host", "::"]])
def test_binding_beyond_this_machine_needs_a_key(tmp_path, args):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "sd3", "serve", *args, "--outputs", str(tmp_path)],
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 2
    assert "--api-key" in r.stderr and "loaded" not in r.stderr and "listening" not in r.stdout


def test_sigterm_ends_cleanly_and_the_history_survives_a_restart(tmp_path):
    server = ServerProcess(tmp_path, "--steps", "4", "--shutdown-grace", "1", "--max-steps", "1000")
    with server.client() as c:
        done = c.post("/v1/jobs", json={"prompt": "kept", "seed": 8}).json()
        done = wait_job(c, done["id"])
        running = c.post("/v1/jobs", json={"prompt": "long", "steps": 1000}).json()
        wait_job(c, running["id"], until=("running",))
        queued = c.post("/v1/jobs", json={"prompt": "queued"}).json()
        before = c.get("/v1/history").json()
    started = time.monotonic()
    assert server.stop(timeout=30) == 0, server.log()
    assert time.monotonic() - started < 20
    again = ServerProcess(tmp_path, "--steps", "4")
    try:
        with again.client() as c:
            assert c.get("/v1/history").json() == before
            assert c.get(f"/v1/jobs/{done['id']}").json()["images"] == done["images"]
            assert c.get(done["images"][0]["url"]).status_code == 200
            assert c.get(f"/v1/jobs/{running['id']}").json()["state"] == "cancelled"
            ended = c.get(f"/v1/jobs/{queued['id']}").json()
            assert ended["state"] == "cancelled" and "shut down" in ended["error"]
    finally:
        assert again.stop() == 0
