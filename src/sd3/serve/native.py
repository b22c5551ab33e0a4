"""sd3's own API: jobs that return at once, progress as server-sent events, results by URL,
cancel, history. Field names are `Settings`' (`pipeline.py`); a request names the served model
and its LoRAs by the names the server was started with, never by a path."""

import base64
import json
import re

from fastapi import APIRouter, HTTPException, Query, Request, Response
from fastapi.responses import FileResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from .. import metadata
from ..pipeline import Settings
from ..presets import Preset
from ..sampling import SAMPLERS
from .jobs import RUNNING
from .service import RequestError, Service

IMAGE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,200}\.png")
KEEP_ALIVE = 15.0  # seconds between comment lines on an idle event stream


class SkipLayerGuidanceRequest(BaseModel):
    """Fields left out keep the served model's default."""

    model_config = ConfigDict(extra="forbid", strict=True)
    scale: float = Field(None, description="0 turns it off")
    layers: list[int] = Field(None, description="joint blocks skipped in the extra pass")
    start: float = Field(None, description="fraction of the steps where it starts")
    end: float = Field(None, description="fraction of the steps where it ends")


class InpaintRequest(BaseModel):
    """How a masked generation treats its mask (`sd3.inpainting.Inpaint`); fields left out
    keep its defaults."""

    model_config = ConfigDict(extra="forbid", strict=True)
    mask_blur: float = Field(None, description="Gaussian feather of the mask, sigma in pixels")
    mask_grow: int = Field(None, description="pixels the mask is dilated by before the blur")
    paste_back: bool = Field(None, description="unmasked pixels exactly the input's")
    crop: int | None = Field(None, description="inpaint a box around the mask, grown by this")
    outpaint: list[int] | None = Field(None, description="pixels added left, top, right, bottom")
    outpaint_fill: str = Field(None, description="edge-noise, edge, grey or noise")


class ControlRequest(BaseModel):
    """One of the server's ControlNets, by name, with its control image."""

    model_config = ConfigDict(extra="forbid", strict=True)
    name: str = Field(description="a ControlNet the server has (GET /v1/info)")
    image: str = Field(description="the control image: base64 PNG/JPEG/WebP or data: URL")
    strength: float = 1.0
    start: float = Field(0.0, description="fraction of the steps where it starts")
    end: float = Field(1.0, description="fraction of the steps where it ends")
    type: str | None = Field(None, description="blur, canny or depth (SD3.5 ControlNets)")
    preprocess: str = Field("none", description="none, canny or blur: made from the image here")


class JobRequest(BaseModel):
    """A generation. Fields left out (or null) take the served model's defaults (`GET
    /v1/info`); unknown fields are refused. LoRAs by name (`loras`, or A1111's
    `<lora:name:strength>` in the prompt)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    prompt: str
    negative_prompt: str | None = None
    steps: int | None = None
    cfg: float | None = Field(None, description="classifier-free guidance scale; 1 turns it off")
    cfg_start: float | None = Field(None, description="CFG from this fraction of the steps")
    cfg_end: float | None = Field(None, description="CFG until this fraction of the steps")
    sampler: str | None = Field(None, description=f"one of {', '.join(SAMPLERS)} (or A1111's name)")
    shift: float | None = None
    seed: int | None = Field(None, description="null or -1: random; image i gets seed + i")
    width: int | None = None
    height: int | None = None
    num_images: int | None = Field(None, description="images of this request (one batch)")
    denoise: float | None = Field(None, description="img2img strength in (0, 1]; default 0.6")
    init_image: str | None = Field(None, description="img2img: base64 PNG/JPEG/WebP or data: URL")
    mask: str | None = Field(None, description="inpainting: base64 image, white = repaint")
    inpaint: InpaintRequest | None = Field(None, description="inpainting settings")
    loras: dict[str, float] | None = Field(
        None, description="{name: strength} of the server's LoRAs (GET /v1/info)"
    )
    controls: list[ControlRequest] | None = Field(
        None, description="the server's ControlNets to run, by name, each with its image"
    )
    slg: SkipLayerGuidanceRequest | None = Field(
        None, description="skip-layer guidance; null turns it off"
    )
    t5_length: int | None = None
    use_t5: bool | None = None
    model: str | None = Field(None, description="the served model's name (GET /v1/info)")


class PngRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    image: str = Field(description="base64 PNG or data: URL")


def settings_from_request(service: Service, req: JobRequest) -> tuple[dict, str | None]:
    """(Settings fields the request gave, its init image) after the native-only checks."""
    given = req.model_dump(exclude_unset=True)
    for name in ("mask", "loras", "controls"):
        given.pop(name, None)
    if req.inpaint is not None:
        given["inpaint"] = req.inpaint.model_dump(exclude_unset=True)
    elif req.mask is not None:
        given["inpaint"] = {}
    service.check_model(given.pop("model", None), "model")
    init_image = given.pop("init_image", None)
    if given.get("sampler") is not None:
        sampler = metadata.sampler_named(given["sampler"])
        if sampler is None:
            raise RequestError(
                "sampler",
                f"unknown sampler {given['sampler']!r}; choose one of {', '.join(SAMPLERS)}",
            )
        given["sampler"] = sampler
    if init_image is not None and given.get("denoise") is None:
        given["denoise"] = 0.6  # as `sd3 generate --init-image`
    return given, init_image


def defaults_view(s: Settings) -> dict:
    d = s.to_dict()
    del d["prompt"], d["seed"]
    return d


def router(service: Service) -> APIRouter:
    api = APIRouter(prefix="/v1", tags=["sd3"])

    @api.get("/health", summary="Liveness: answers without a key")
    def health() -> dict:
        queued, running = service.queue.counts()
        return {"status": "shutting down" if service.queue.closed else "ok",
                "queued": queued, "running": running}  # fmt: skip

    @api.get("/info", summary="The served model, its defaults, the samplers and the limits")
    def info() -> dict:
        preset: Preset = service.pipe.preset
        return {
            "model": {
                "name": service.model_name,
                "file": service.model_file,
                "hash": service.model_hash,
                "title": service.model_title,
                "preset": preset.name,
            },  # fmt: skip
            "defaults": defaults_view(service.defaults),
            "samplers": [
                {"name": name, "a1111": metadata.A1111_SAMPLERS[name][0]} for name in SAMPLERS
            ],
            "limits": vars(service.limits),
            "max_size": service.pipe.config.pos_embed_max_size * service.pipe.config.patch_size * 8,
            "features": {
                "img2img": True,
                "inpainting": True,
                "loras": sorted(service.loras),
                "controlnets": sorted(service.controlnets),
            },
            "live_previews": service.worker.live_previews,
        }

    @api.post("/jobs", status_code=202, summary="Queue a generation; answers at once")
    def submit(req: JobRequest, response: Response) -> dict:
        given, init_image = settings_from_request(service, req)
        given["prompt"], loras = service.prompt_loras(given["prompt"])
        for name, scale in (req.loras or {}).items():
            loras[name] = loras.get(name, 0.0) + scale
        image = service.decode_image(init_image, "init_image") if init_image is not None else None
        mask = service.decode_image(req.mask, "mask") if req.mask is not None else None
        controls = [
            {**c.model_dump(), "image": service.decode_image(c.image, f"controls.{i}.image")}
            for i, c in enumerate(req.controls or [])
        ]
        job = service.new_job(
            given, image, "native", mask=mask, loras=loras,
            controls=service.control_inputs(controls),
        )  # fmt: skip
        service.queue.submit(job)
        response.headers["Location"] = f"/v1/jobs/{job.id}"
        return job.view(service.queue.position(job))

    @api.get("/jobs", summary="The queued and running jobs")
    def jobs() -> dict:
        running, queued = service.queue.snapshot()
        return {
            "running": [j.view(0) for j in running if j.state == RUNNING],
            "queued": [j.view(i + 1) for i, j in enumerate(queued)],
        }

    @api.get("/jobs/{job_id}", summary="A job's state, step, ETA and result URLs")
    def job(job_id: str) -> dict:
        view = service.job_view(job_id)
        if view is None:
            raise HTTPException(404, f"no job {job_id!r}")
        return view

    @api.delete(
        "/jobs/{job_id}", summary="Cancel: a queued job at once, a running one at its next step"
    )
    def cancel(job_id: str, response: Response) -> dict:
        job = service.queue.get(job_id)
        if job is None:
            view = service.job_view(job_id)
            if view is None:
                raise HTTPException(404, f"no job {job_id!r}")
            raise HTTPException(409, f"job {job_id} has ended ({view['state']})")
        if job.ended:
            raise HTTPException(409, f"job {job_id} has ended ({job.state})")
        service.queue.cancel(job)
        if not job.ended:
            response.status_code = 202  # stops at its next step
        return {**job.view(service.queue.position(job)), "cancel_requested": True}

    @api.get(
        "/jobs/{job_id}/events",
        summary="Progress as server-sent events",
        description="Events `progress` (state, queue position, step, steps, ETA and, when a "
        "step made one, `preview`: a PNG data: URL of the current prediction of the first "
        "image) and, last, one of `done`, `failed` or `cancelled` with the job's full view.",
        response_class=StreamingResponse,
    )
    async def events(job_id: str, request: Request):
        job = service.queue.get(job_id)
        if job is None:
            view = service.job_view(job_id)
            if view is None:
                raise HTTPException(404, f"no job {job_id!r}")
            final = f"event: {view['state']}\ndata: {json.dumps(view)}\n\n"

            async def ended():
                yield final

            return StreamingResponse(ended(), media_type="text/event-stream")

        async def stream():
            last, sent_preview = None, 0
            while True:
                if job.ended:
                    view = job.view(None)
                    yield f"event: {job.state}\ndata: {json.dumps(view)}\n\n"
                    return
                position = service.queue.position(job)
                state = (job.state, position, job.step)
                if state != last or job.preview_step != sent_preview:
                    event = {
                        "id": job.id, "state": job.state, "queue_position": position,
                        "step": job.step, "steps": job.steps, "eta": job.eta,
                    }  # fmt: skip
                    preview = job.preview
                    if preview is not None and job.preview_step != sent_preview:
                        sent_preview = job.preview_step
                        event["preview"] = "data:image/png;base64," + base64.b64encode(
                            preview
                        ).decode("ascii")
                        event["preview_step"] = sent_preview
                    last = state
                    yield f"event: progress\ndata: {json.dumps(event)}\n\n"
                if not await service.hub.wait(KEEP_ALIVE):
                    if await request.is_disconnected():
                        return
                    yield ": keep-alive\n\n"

        return StreamingResponse(
            stream(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    @api.get("/images/{name}", summary="A finished image (PNG with its settings)",
             response_class=FileResponse)  # fmt: skip
    def image(name: str):
        path = service.outputs / name
        if (
            not IMAGE_NAME.fullmatch(name)
            or ".." in name
            or not service.history.has_image(name)
            or path.resolve().parent != service.outputs.resolve()
            or not path.is_file()
        ):
            raise HTTPException(404, "no such image")
        return FileResponse(
            path, media_type="image/png", headers={"Cache-Control": "private, max-age=86400"}
        )

    @api.get("/history", summary="Finished images, newest first; `q` searches the prompts")
    def history(
        limit: int = Query(24, ge=1, le=200),
        offset: int = Query(0, ge=0),
        q: str = Query("", max_length=500),
    ) -> dict:
        total, items = service.history.images(limit, offset, q)
        for item in items:
            item["url"] = f"/v1/images/{item['name']}"
        return {"total": total, "limit": limit, "offset": offset, "items": items}

    @api.post("/png-info", summary="The settings a PNG made by sd3 or A1111 carries")
    def png_info(req: PngRequest) -> dict:
        found = service.png_info(req.image)
        if found["sd3"] is not None:
            settings = found["sd3"]["settings"].to_dict()
            model = found["sd3"]["files"]["model"]
            return {"source": "sd3", "settings": settings, "left_out": [],
                    "model": model["name"] if model else None}  # fmt: skip
        if found["parameters"] is not None:
            settings, left_out = metadata.settings_from_parameters(found["parameters"])
            return {"source": "a1111", "settings": settings, "left_out": left_out,
                    "model": None}  # fmt: skip
        raise RequestError("image", "image: this PNG carries no sd3 or A1111 settings")

    return api
