"""The AUTOMATIC1111 web API (`/sdapi/v1/...`), close enough that A1111 clients work unchanged.

Requests carry A1111's field names and types; fields left out take the served model's
defaults (A1111's own defaults are SD1.5's: 512x512, 50 steps, CFG 7). An A1111 field that
would change the result where sd3 cannot follow (hires fix, face restoration, tiling,
subseeds, scripts, latent masks, ...) is refused with a 422 naming it; one that changes
nothing here (saving options, hires settings with hires off, ...) is ignored, and so are keys
A1111 does not know either (as A1111 does); `info` lists those.
Samplers go by A1111's names (`metadata.A1111_SAMPLERS`). Responses are A1111's: base64 PNGs
with sd3's metadata, the request echoed as `parameters`, and `info` as a JSON string.

Inpainting (`img2img` with `mask`, white = repaint) maps onto `sd3.inpainting`: `mask_blur`
(or equal `mask_blur_x`/`_y`) is the Gaussian feather's sigma in pixels, as A1111's;
`inpaint_full_res` ("only masked") crops a box around the mask grown by
`inpaint_full_res_padding` and pastes the result back; `inpainting_mask_invert` 1 inverts the
mask; `inpainting_fill` 1 ("original") is sd3's blend, 0 ("fill") first fills the masked area
with the colours around it (A1111's `masking.fill`), and 2/3 ("latent noise"/"nothing") differ
from "original" only below denoising strength 1, where they are refused. LoRAs come as A1111's
`<lora:name:strength>` tags in the prompt, by the names the server has (`GET /loras`).
ControlNets come as A1111's ControlNet extension sends them (`alwayson_scripts.controlnet.args`:
`model` by name, `image`, `module` none/canny/blur_gaussian, `weight`, `guidance_start/end`).
"""

import base64
import json
import time
from dataclasses import replace
from typing import Any

from fastapi import APIRouter, HTTPException
from fastapi.concurrency import run_in_threadpool
from PIL import Image, ImageFilter, ImageOps
from pydantic import BaseModel, ConfigDict, Field

from .. import metadata
from ..sampling import SAMPLERS
from .jobs import CANCELLED, DONE, RUNNING
from .service import RequestError, Service

SCHEDULERS = ("automatic", "simple")  # A1111's default and the one schedule sd3 runs
VERSION = "sd3"


class A1111Request(BaseModel):
    """The fields both A1111 requests share; unknown keys are accepted (and ignored)."""

    model_config = ConfigDict(extra="allow")
    prompt: str = ""
    negative_prompt: str = ""
    styles: list[str] | None = None
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0
    seed_resize_from_h: int = -1
    seed_resize_from_w: int = -1
    sampler_name: str | None = None
    sampler_index: str | None = None
    scheduler: str | None = None
    batch_size: int = 1
    n_iter: int = 1
    steps: int | None = Field(None, description="default: the served model's")
    cfg_scale: float | None = Field(None, description="default: the served model's")
    width: int | None = Field(None, description="default: the served model's")
    height: int | None = Field(None, description="default: the served model's")
    restore_faces: bool | None = None
    tiling: bool | None = None
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    eta: float | None = None
    denoising_strength: float | None = None
    s_min_uncond: float | None = None
    s_churn: float | None = None
    s_tmax: float | None = None
    s_tmin: float | None = None
    s_noise: float | None = None
    override_settings: dict[str, Any] | None = None
    override_settings_restore_afterwards: bool = True
    refiner_checkpoint: str | None = None
    refiner_switch_at: float | None = None
    disable_extra_networks: bool = False
    comments: dict[str, Any] | None = None
    script_name: str | None = None
    script_args: list = []
    send_images: bool = True
    save_images: bool = False
    alwayson_scripts: dict[str, Any] = {}
    force_task_id: str | None = None
    infotext: str | None = None


class Txt2ImgRequest(A1111Request):
    enable_hr: bool = False
    firstphase_width: int = 0
    firstphase_height: int = 0
    hr_scale: float = 2.0
    hr_upscaler: str | None = None
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_checkpoint_name: str | None = None
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str = ""
    hr_negative_prompt: str = ""
    firstpass_image: str | None = None


class Img2ImgRequest(A1111Request):
    init_images: list[str] | None = None
    resize_mode: int = 0
    image_cfg_scale: float | None = None
    mask: str | None = Field(None, description="inpainting: base64 image, white = repaint")
    mask_blur_x: int = 4
    mask_blur_y: int = 4
    mask_blur: int | None = None
    mask_round: bool = True
    inpainting_fill: int = 0
    inpaint_full_res: bool = True
    inpaint_full_res_padding: int = 0
    inpainting_mask_invert: int = 0
    initial_noise_multiplier: float | None = None
    latent_mask: str | None = None
    include_init_images: bool = False


class ImageResponse(BaseModel):
    images: list[str] = Field(description="base64 PNGs carrying sd3's and A1111's metadata")
    parameters: dict[str, Any]
    info: str = Field(description="a JSON string, as A1111 returns it")


class PngInfoRequest(BaseModel):
    image: str


def _off(v) -> bool:
    return not v


def _is(*values):
    return lambda v: v in (None, *values)


# A1111 fields sd3 cannot follow: harmless only with these values, else a 422 names them
REFUSED_UNLESS = {
    "enable_hr": _off,
    "restore_faces": _off,
    "tiling": _off,
    "subseed_strength": _off,
    "seed_resize_from_h": _is(-1, 0),
    "seed_resize_from_w": _is(-1, 0),
    "styles": _off,
    "script_name": _off,
    "script_args": _off,
    "s_churn": _is(0),
    "s_noise": _is(1),
    "s_min_uncond": _is(0),
    "refiner_checkpoint": lambda v: not v or v == "None",
    "infotext": _off,
    "firstpass_image": _off,
    "resize_mode": _is(0),  # 0: just resize, what sd3 does
    "latent_mask": _off,
    "initial_noise_multiplier": _is(1),
}
# override_settings sd3 can honour, and the values it can
OVERRIDES = {
    "CLIP_stop_at_last_layers": _is(1),
    "samples_format": _is("png"),
    "sd_vae": _is("Automatic", "None"),
}


def a1111_name(sampler: str) -> str:
    return metadata.A1111_SAMPLERS[sampler][0]


def request_settings(service: Service, req: A1111Request, img2img: bool) -> dict:
    """The request as Settings fields, or one RequestError naming the A1111 field."""
    for name, harmless in REFUSED_UNLESS.items():
        if name in type(req).model_fields and not harmless(getattr(req, name)):
            raise RequestError(
                name, f"{name}={getattr(req, name)!r} is not supported by this server"
            )
    for key, value in (req.override_settings or {}).items():
        if key == "sd_model_checkpoint":
            service.check_model(value, "override_settings.sd_model_checkpoint")
        elif key not in OVERRIDES or not OVERRIDES[key](value):
            raise RequestError(
                f"override_settings.{key}", f"override_settings {key}={value!r} is not supported"
            )
    given: dict[str, Any] = {
        "prompt": req.prompt or "",
        "negative_prompt": req.negative_prompt or "",
        "steps": req.steps,
        "cfg": req.cfg_scale,
        "width": req.width,
        "height": req.height,
        "seed": req.seed,
    }
    name = req.sampler_name or req.sampler_index
    if name:
        sampler = metadata.sampler_named(name)
        if sampler is None:
            field = "sampler_name" if req.sampler_name else "sampler_index"
            names = ", ".join(a1111_name(s) for s in SAMPLERS)
            raise RequestError(field, f"sampler {name!r} not found; this server has {names}")
        given["sampler"] = sampler
    sampler = given.get("sampler", service.defaults.sampler)
    if req.eta not in (None, 1) and sampler in ("euler_ancestral", "dpmpp_2m_sde"):
        raise RequestError("eta", f"eta={req.eta} is not supported (sd3's {sampler} uses eta 1)")
    if req.scheduler and req.scheduler.lower() not in SCHEDULERS:
        raise RequestError(
            "scheduler", f"scheduler {req.scheduler!r} not found; this server has Simple"
        )
    for field in ("batch_size", "n_iter"):
        if getattr(req, field) < 1:
            raise RequestError(field, f"{field} must be >= 1, got {getattr(req, field)}")
    given["num_images"] = req.batch_size * req.n_iter
    if given["num_images"] > service.limits.max_batch:
        raise RequestError(
            "batch_size",
            f"batch_size x n_iter = {given['num_images']} is above this server's limit "
            f"({service.limits.max_batch})",
        )
    if img2img:
        given["denoise"] = 0.75 if req.denoising_strength is None else req.denoising_strength
    return given


FILLS = {0: "fill", 1: "original", 2: "latent noise", 3: "latent nothing"}


def inpaint_settings(req: Img2ImgRequest, denoise: float) -> dict:
    """A1111's inpainting fields as `Inpaint`'s, or one RequestError naming the field."""
    if req.mask_blur is not None:
        blur = req.mask_blur
    elif req.mask_blur_x == req.mask_blur_y:
        blur = req.mask_blur_x
    else:
        raise RequestError(
            "mask_blur_x", "mask_blur_x and mask_blur_y must agree (sd3 blurs both ways alike)"
        )
    if blur < 0:
        raise RequestError("mask_blur", f"mask_blur must be >= 0, got {blur}")
    if req.inpaint_full_res_padding < 0:
        raise RequestError(
            "inpaint_full_res_padding",
            f"inpaint_full_res_padding must be >= 0, got {req.inpaint_full_res_padding}",
        )
    if req.inpainting_fill not in FILLS:
        raise RequestError(
            "inpainting_fill", f"inpainting_fill must be one of 0-3, got {req.inpainting_fill}"
        )
    if req.inpainting_fill in (2, 3) and denoise < 1:
        raise RequestError(
            "inpainting_fill",
            f"inpainting_fill {req.inpainting_fill} ({FILLS[req.inpainting_fill]}) is not "
            "supported below denoising_strength 1; use 1 (original) or 0 (fill)",
        )
    if req.inpainting_mask_invert not in (0, 1):
        raise RequestError("inpainting_mask_invert", "inpainting_mask_invert must be 0 or 1")
    crop = req.inpaint_full_res_padding if req.inpaint_full_res else None
    return {"mask_blur": float(blur), "crop": crop}


def fill(image: Image.Image, mask: Image.Image) -> Image.Image:
    """A1111's `masking.fill`: the masked area painted with ever less blurred copies of the
    unmasked pixels, so that it starts from the colours around it."""
    out = Image.new("RGBA", image.size)
    kept = Image.new("RGBa", image.size)
    kept.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
    for radius, repeats in ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1)):
        blurred = kept.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(repeats):
            out.alpha_composite(blurred)
    return out.convert("RGB")


def inpainting_inputs(
    service: Service, req: Img2ImgRequest, image: Image.Image, denoise: float
) -> tuple[Image.Image, Image.Image, dict]:
    """(init image, mask, Inpaint's fields) of an img2img request with a mask."""
    inpaint = inpaint_settings(req, denoise)
    mask = service.decode_image(req.mask, "mask").convert("L")
    if req.inpainting_mask_invert:
        mask = ImageOps.invert(mask)
    if mask.size != image.size:
        mask = mask.resize(image.size, Image.Resampling.BILINEAR)
    if req.inpainting_fill == 0:
        image = fill(image, mask)
    return image, mask, inpaint


CONTROLNET_MODULES = {"none": "none", "canny": "canny", "blur_gaussian": "blur"}


def controlnet_units(req: A1111Request) -> list[dict]:
    """The A1111 ControlNet extension's enabled units as `Service.control_inputs` takes them
    (images still base64), or one RequestError; any other always-on script is refused."""
    units = []
    for key, value in (req.alwayson_scripts or {}).items():
        if key.lower() != "controlnet":
            raise RequestError(
                "alwayson_scripts", f"alwayson_scripts {key!r} is not supported (only ControlNet)"
            )
        args = value.get("args") if isinstance(value, dict) else None
        if not isinstance(args, list):
            raise RequestError(
                "alwayson_scripts", "alwayson_scripts.controlnet.args must be a list"
            )
        for i, unit in enumerate(args):
            field = f"alwayson_scripts.controlnet.args.{i}"
            if not isinstance(unit, dict):
                raise RequestError(field, f"{field} must be an object")
            if not unit.get("enabled", True):
                continue
            name = str(unit.get("model") or "None").split(" [")[0]
            module = unit.get("module") or "none"
            image = unit.get("image") or unit.get("input_image")
            if isinstance(image, dict):  # {"image": ..., "mask": ...}
                image = image.get("image")
            if name == "None":
                raise RequestError(field, f"{field}: model names no ControlNet")
            if module not in CONTROLNET_MODULES:
                raise RequestError(
                    field,
                    f"{field}: module {module!r} is not supported; this server has "
                    f"{', '.join(CONTROLNET_MODULES)}",
                )
            if unit.get("control_mode", 0) not in (0, "Balanced"):
                raise RequestError(field, f"{field}: only control_mode Balanced is supported")
            if not isinstance(image, str):
                raise RequestError(field, f"{field}: image must be a base64 image")
            numbers = [unit.get(k, d) for k, d in (("weight", 1.0), ("guidance_start", 0.0),
                                                    ("guidance_end", 1.0))]  # fmt: skip
            if not all(isinstance(x, int | float) for x in numbers):
                raise RequestError(field, f"{field}: weight and guidance_start/end are numbers")
            unit_out = {"name": name, "image": image, "strength": float(numbers[0]),
                        "start": float(numbers[1]), "end": float(numbers[2]), "type": None,
                        "preprocess": CONTROLNET_MODULES[module]}  # fmt: skip
            low, high = unit.get("threshold_a"), unit.get("threshold_b")
            if module == "canny" and isinstance(low, int | float) and low >= 0:
                unit_out["canny_low"] = int(low)
                if isinstance(high, int | float) and high >= 0:
                    unit_out["canny_high"] = int(high)
            units.append(unit_out)
    return units


def control_inputs(service: Service, units: list[dict]):
    """`Service.control_inputs` of the units, their images decoded (off the event loop)."""
    decoded = [
        {**u, "image": service.decode_image(u["image"], f"alwayson_scripts.controlnet.args.{i}")}
        for i, u in enumerate(units)
    ]
    return service.control_inputs(decoded, "alwayson_scripts")


def ignored_fields(req: A1111Request) -> list[str]:
    return sorted(req.model_extra or {})


def info_json(service: Service, req: A1111Request, job, ignored: list[str]) -> str:
    """A1111's `Processed.js()`, from the job's settings."""
    s = job.settings
    n = s.num_images
    records = service.worker.job_records(job)
    infotexts = [
        metadata.a1111_parameters(
            replace(s, seed=s.seed + i, num_images=1), records["model"], records.get("loras", [])
        )
        for i in range(n)
    ]
    return json.dumps(
        {
            "prompt": s.prompt,
            "all_prompts": [s.prompt] * n,
            "negative_prompt": s.negative_prompt,
            "all_negative_prompts": [s.negative_prompt] * n,
            "seed": s.seed,
            "all_seeds": [s.seed + i for i in range(n)],
            "subseed": -1,
            "all_subseeds": [-1] * n,
            "subseed_strength": 0,
            "width": s.width,
            "height": s.height,
            "sampler_name": a1111_name(s.sampler),
            "cfg_scale": s.cfg,
            "steps": s.steps,
            "batch_size": req.batch_size,
            "restore_faces": False,
            "face_restoration_model": None,
            "sd_model_name": service.model_name,
            "sd_model_hash": service.model_hash,
            "sd_vae_name": None,
            "sd_vae_hash": None,
            "seed_resize_from_w": -1,
            "seed_resize_from_h": -1,
            "denoising_strength": s.denoise if s.denoise < 1 else None,
            "extra_generation_params": {"Shift": s.shift, "Schedule type": "Simple"},
            "index_of_first_image": 0,
            "infotexts": infotexts,
            "styles": [],
            "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(job.created)),
            "clip_skip": 1,
            "is_using_inpainting_conditioning": False,
            "inpainting": s.inpaint is not None,
            "version": VERSION,
            "interrupted": job.state == CANCELLED,
            "sd3": {"job_id": job.id, "images": [i["name"] for i in job.images]},
            "ignored_fields": ignored,
        }
    )


def router(service: Service) -> APIRouter:
    api = APIRouter(prefix="/sdapi/v1", tags=["AUTOMATIC1111"])

    async def run(req: A1111Request, img2img: bool) -> dict:
        given = request_settings(service, req, img2img)
        given["prompt"], loras = service.prompt_loras(given["prompt"])
        service.check_loras(loras, "prompt")  # a 422 names where the tags came from
        units = controlnet_units(req)
        controls = ((), (), [])
        if units:
            controls = await run_in_threadpool(control_inputs, service, units)
        image = mask = None
        if img2img:
            if not req.init_images:
                raise RequestError("init_images", "init_images must hold one base64 image")
            image = await run_in_threadpool(service.decode_image, req.init_images[0], "init_images")
            if req.mask:
                image, mask, given["inpaint"] = await run_in_threadpool(
                    inpainting_inputs, service, req, image, given["denoise"]
                )
        job = service.new_job(given, image, "a1111", mask=mask, loras=loras, controls=controls)
        service.queue.submit(job)
        await service.hub.until_ended(job)
        if job.state not in (DONE, CANCELLED):
            raise HTTPException(500, f"generation failed: {job.error}")
        images = []
        if req.send_images and job.state == DONE:
            images = await run_in_threadpool(read_images, service, job)
        parameters = req.model_dump()
        if img2img and not getattr(req, "include_init_images", False):
            parameters["init_images"] = None
            parameters["mask"] = None
        return {
            "images": images,
            "parameters": parameters,
            "info": info_json(service, req, job, ignored_fields(req)),
        }

    @api.post("/txt2img", response_model=ImageResponse)
    async def txt2img(req: Txt2ImgRequest) -> dict:
        return await run(req, img2img=False)

    @api.post("/img2img", response_model=ImageResponse)
    async def img2img(req: Img2ImgRequest) -> dict:
        return await run(req, img2img=True)

    @api.get("/progress")
    def progress(skip_current_image: bool = False) -> dict:
        queue = service.queue
        queued, running = queue.counts()
        job = next((j for j in list(queue.running) if j.state == RUNNING), None)
        state = {
            "skipped": False, "interrupted": False, "stopping_generation": False,
            "job": "", "job_count": queued + running, "job_timestamp": "0", "job_no": 0,
            "sampling_step": 0, "sampling_steps": 0,
        }  # fmt: skip
        if job is None:
            return {"progress": 0.0, "eta_relative": 0.0, "state": state,
                    "current_image": None, "textinfo": None}  # fmt: skip
        state.update(
            job=f"{job.source} {job.id}",
            interrupted=job.cancel_requested,
            job_timestamp=time.strftime("%Y%m%d%H%M%S", time.localtime(job.created)),
            sampling_step=job.step,
            sampling_steps=job.steps or job.settings.steps,
        )
        preview = job.preview
        current = None
        if preview is not None and not skip_current_image:
            current = base64.b64encode(preview).decode("ascii")
        return {
            "progress": job.step / job.steps if job.steps else 0.0,
            "eta_relative": job.eta or 0.0,
            "state": state,
            "current_image": current,
            "textinfo": f"step {job.step} of {job.steps}" if job.steps else "starting",
        }

    @api.post("/interrupt", summary="Stop the running generation at its next step")
    def interrupt() -> dict:
        for job in list(service.queue.running):
            if job.state == RUNNING:
                service.queue.cancel(job)
        return {}

    api.add_api_route("/skip", interrupt, methods=["POST"], summary="As /interrupt")

    @api.get("/sd-models")
    def sd_models() -> list[dict]:
        return [
            {
                "title": service.model_title,
                "model_name": service.model_name,
                "hash": service.model_hash,
                "sha256": None,
                "filename": service.model_file,
                "config": None,
            }
        ]

    @api.get("/samplers")
    def samplers() -> list[dict]:
        return [
            {"name": names[0], "aliases": [*names[1:], ours], "options": {}}
            for ours, names in metadata.A1111_SAMPLERS.items()
        ]

    @api.get("/schedulers")
    def schedulers() -> list[dict]:
        return [
            {
                "name": "simple",
                "label": "Simple",
                "aliases": ["automatic"],
                "default_rho": -1,
                "need_inner_model": False,
            }  # fmt: skip
        ]

    @api.get("/options")
    def get_options() -> dict:
        return {
            "sd_model_checkpoint": service.model_title,
            "sd_checkpoint_hash": service.model_hash,
            "samples_format": "png",
            "CLIP_stop_at_last_layers": 1,
            "live_previews_enable": service.worker.live_previews,
            "show_progress_every_n_steps": 1,
        }

    @api.post("/options", summary="Set options: the model (this one), previews on or off")
    def set_options(options: dict[str, Any]) -> dict:
        for key, value in options.items():
            if key == "live_previews_enable":
                if not isinstance(value, bool):
                    raise RequestError(key, f"{key} must be true or false")
                if value and service.worker.previews is None:
                    raise RequestError(key, "this server was started without previews")
            elif key == "sd_model_checkpoint":
                service.check_model(value, key)
            elif key not in OVERRIDES or not OVERRIDES[key](value):
                raise RequestError(key, f"option {key}={value!r} is not supported")
        if "live_previews_enable" in options:
            service.worker.live_previews = options["live_previews_enable"]
        return {}

    @api.post("/png-info")
    def png_info(req: PngInfoRequest) -> dict:
        found = service.png_info(req.image)
        parameters = found["parameters"]
        return {
            "info": parameters or "",
            "items": {**found["items"], **({"sd3": "present"} if found["sd3"] else {})},
            "parameters": metadata.parse_parameters(parameters) if parameters else {},
        }

    @api.get("/loras", summary="The LoRAs this server has, for <lora:name:strength> tags")
    def loras() -> list[dict]:
        return [
            {"name": name, "alias": name, "path": path.name, "metadata": {}}
            for name, path in sorted(service.loras.items())
        ]

    api.add_api_route(
        "/refresh-loras", lambda: None, methods=["POST"], summary="Nothing: fixed at start"
    )
    for listing in ("upscalers", "latent-upscale-modes", "sd-vae"):
        api.add_api_route(f"/{listing}", lambda: [], methods=["GET"], summary="none here")
    api.add_api_route(
        "/scripts", lambda: {"txt2img": [], "img2img": []}, methods=["GET"], summary="none here"
    )

    return api


def read_images(service: Service, job) -> list[str]:
    return [
        base64.b64encode((service.outputs / image["name"]).read_bytes()).decode("ascii")
        for image in job.images
    ]
