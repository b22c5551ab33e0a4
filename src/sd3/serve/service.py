"""What the HTTP layers share: the model, the limits, requests turned into checked jobs, the
queue, the worker and the history. Both APIs (`native.py`, `a1111.py`) and the page go
through `Service.new_job`, so every request meets the same defaults and checks."""

import base64
import binascii
import io
import math
import re
import secrets
from dataclasses import dataclass, fields, replace
from pathlib import Path

from PIL import Image

from .. import metadata
from ..checkpoints import Component, infer_config
from ..cli import file_records
from ..control import Control, resolve_type
from ..inpainting import Inpaint
from ..pipeline import Pipeline, Settings, check_settings, load_image
from ..preprocess import Preprocess, preprocess
from ..sampling import SkipLayerGuidance
from .history import History
from .jobs import Hub, Job, JobQueue, Worker, batch_key
from .preview import PreviewMap

IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")  # the decoders a client's image may reach
MAX_RANDOM_SEED = 2**32  # random seeds are 32-bit, as A1111's
MAX_T5_LENGTH = 512  # T5 tokens a request may fix (diffusers' largest max_sequence_length)
MAX_LORA_SCALE = 10.0  # |strength| a request may give a LoRA
LORA_TAG = re.compile(r"<lora:([^:>]*)((?::[^:>]*)*)>")  # A1111's <lora:name:scale> in a prompt


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; `sd3 serve --max-...` sets them."""

    max_width: int = 2048
    max_height: int = 2048
    max_steps: int = 150
    max_batch: int = 8  # images per request
    max_queue: int = 32  # jobs waiting (the running batch not counted)
    batch_limit: int = 8  # images per denoising batch made of several jobs (1: no batching)
    max_body: int = 32 << 20  # bytes of a request body, checked before it is parsed
    max_image_pixels: int = 4096 * 4096  # of an uploaded image, checked before it is decoded
    max_prompt: int = 10_000  # characters of a prompt or negative prompt


class RequestError(ValueError):
    """A request the server refuses (HTTP 422): `field` names what is wrong, where known."""

    def __init__(self, field: str | None, message: str):
        super().__init__(message)
        self.field = field


SETTING_NAMES = tuple(f.name for f in fields(Settings))
NULLABLE = ("crop", "outpaint")  # Inpaint's fields where None means something


class Service:
    def __init__(
        self,
        pipe: Pipeline,
        files: dict,
        defaults: Settings,
        outputs: Path,
        limits: Limits | None = None,
        previews: PreviewMap | None = None,
        shutdown_grace: float = 30.0,
        loras: dict[str, Path] | None = None,
        controlnets: dict[str, tuple[Path, Component]] | None = None,
    ):
        self.pipe, self.defaults, self.outputs = pipe, defaults, outputs
        self.loras = dict(loras or {})  # name -> file, loaded beside the weights at strength 0
        self.controlnets = dict(controlnets or {})  # name -> (file, ControlNet), run when asked
        self.limits = limits = limits or Limits()
        self.shutdown_grace = shutdown_grace
        self.records = file_records(files)
        model = self.records["model"]
        self.model_file = model["name"]
        self.model_hash = model["sha256"]
        self.model_title = (
            f"{self.model_file} [{self.model_hash}]" if self.model_hash else self.model_file
        )
        self.history = History(outputs)
        self.hub = Hub()
        self.queue = JobQueue(limits.max_queue, limits.batch_limit, self.history, self.hub)
        lora_records = {name: metadata.lora_record(path, 1.0) for name, path in self.loras.items()}
        self.worker = Worker(
            self.queue, pipe, outputs, self.records, self.model_file, previews, lora_records,
            self.controlnets,
        )  # fmt: skip

    @property
    def model_name(self) -> str:
        return Path(self.model_file).stem if self.model_hash else self.model_file

    def model_names(self) -> set[str]:
        """The names a request may give for the served model."""
        return {self.model_file, self.model_name, self.model_title}

    def start(self) -> None:
        self.worker.start()

    def shutdown(self) -> None:
        """Stop taking jobs; cancel the queued; let the running batch finish or stop it."""
        self.queue.close(self.shutdown_grace)

    def close(self, timeout: float | None = None) -> None:
        self.shutdown()
        self.worker.join(timeout)
        self.history.close()

    # --- requests -> jobs ---------------------------------------------------------------------

    def settings(self, given: dict) -> Settings:
        """The defaults with what a request gave (Settings' field names; a value of None keeps
        the default, except `slg`: None turns skip-layer guidance off). A seed of None or -1 is
        drawn at random."""
        unknown = sorted(set(given) - set(SETTING_NAMES))
        if unknown:
            raise RequestError(unknown[0], f"unknown settings {unknown}")
        chosen = {k: v for k, v in given.items() if v is not None or k == "slg"}
        if isinstance(chosen.get("inpaint"), dict):
            inpaint = {k: v for k, v in chosen["inpaint"].items() if v is not None or k in NULLABLE}
            if inpaint.get("outpaint") is not None:
                if len(inpaint["outpaint"]) != 4:
                    raise RequestError(
                        "inpaint.outpaint", "outpaint takes 4 numbers: left, top, right, bottom"
                    )
                inpaint["outpaint"] = tuple(inpaint["outpaint"])
            chosen["inpaint"] = Inpaint(**inpaint)
        if isinstance(chosen.get("slg"), dict):
            base = self.defaults.slg or SkipLayerGuidance()
            slg = {**vars(base), **chosen["slg"]}
            chosen["slg"] = SkipLayerGuidance(**{**slg, "layers": tuple(slg["layers"])})
        if chosen.get("seed") in (None, -1):
            chosen["seed"] = secrets.randbelow(MAX_RANDOM_SEED)
        return replace(self.defaults, **chosen)

    def check(
        self, s: Settings, init_image: Image.Image | None, mask: Image.Image | None = None
    ) -> None:
        """The server's limits, then the model's (`check_settings`): one RequestError."""
        lim = self.limits
        for name, value, limit in (
            ("width", s.width, lim.max_width),
            ("height", s.height, lim.max_height),
            ("steps", s.steps, lim.max_steps),
            ("num_images", s.num_images, lim.max_batch),
        ):
            if value > limit:
                raise RequestError(name, f"{name} {value} is above this server's limit ({limit})")
        if s.t5_length is not None and s.t5_length > MAX_T5_LENGTH:
            raise RequestError(
                "t5_length",
                f"t5_length {s.t5_length} is above this server's limit ({MAX_T5_LENGTH})",
            )
        for name in ("prompt", "negative_prompt"):
            if len(getattr(s, name)) > lim.max_prompt:
                raise RequestError(name, f"{name} is longer than {lim.max_prompt} characters")
        try:
            check_settings(s, self.pipe.config, init_image is not None, mask is not None)
        except ValueError as e:
            masked = s.inpaint is not None and any(w in str(e) for w in ("mask", "paint"))
            raise RequestError("mask" if masked else None, str(e)) from None
        if (
            mask is not None
            and s.inpaint.outpaint is None
            and mask.convert("L").getextrema()[1] == 0
        ):
            raise RequestError("mask", "the mask is empty (all black): there is nothing to repaint")

    def check_loras(self, loras: dict, field: str = "loras") -> tuple[tuple[str, float], ...]:
        """The LoRAs a request chose, by the names this server has, as ((name, strength), ...)
        sorted, strength 0 left out; or one RequestError."""
        chosen = []
        for name, scale in loras.items():
            if name not in self.loras:
                have = ", ".join(sorted(self.loras)) or "none (start with --lora-dir DIR)"
                raise RequestError(field, f"no LoRA named {name!r} here; this server has {have}")
            if (
                not isinstance(scale, int | float)
                or not math.isfinite(scale)
                or abs(scale) > MAX_LORA_SCALE
            ):
                raise RequestError(
                    field, f"LoRA {name}: strength must be a number in ±{MAX_LORA_SCALE:g}"
                )
            if scale != 0:
                chosen.append((name, float(scale)))
        return tuple(sorted(chosen))

    def prompt_loras(self, prompt: str, field: str = "prompt") -> tuple[str, dict]:
        """A1111's extra-network tags: the prompt without its <lora:name[:strength]> tags, and
        {name: strength} (repeated names add up, as A1111's do)."""
        loras: dict[str, float] = {}

        def take(m: re.Match) -> str:
            name, rest = m.group(1).strip(), m.group(2)
            numbers = [x for x in rest.split(":")[1:]]
            if len(numbers) > 1:
                raise RequestError(
                    field, f"<lora:{name}{rest}>: one strength only (text-encoder and MMDiT "
                    "strengths apart are not supported)"
                )  # fmt: skip
            try:
                scale = float(numbers[0]) if numbers and numbers[0].strip() else 1.0
            except ValueError:
                raise RequestError(
                    field, f"<lora:{name}{rest}>: the strength is not a number"
                ) from None
            loras[name] = loras.get(name, 0.0) + scale
            return ""

        return LORA_TAG.sub(take, prompt).strip(), loras

    def control_inputs(
        self, given: list[dict], field: str = "controls"
    ) -> tuple[tuple[str, ...], tuple[Control, ...], list[Image.Image]]:
        """(ControlNet names, their Controls, their control images) of a request's
        [{"name", "image" (decoded), "strength", "start", "end", "type", "preprocess"}], the
        images preprocessed; or one RequestError. Run it off the event loop (preprocessing)."""
        names, controls, images = [], [], []
        for i, c in enumerate(given):
            name = c["name"]
            if name not in self.controlnets:
                have = ", ".join(sorted(self.controlnets)) or "none (start with --controlnet FILE)"
                raise RequestError(
                    field, f"no ControlNet named {name!r} here; this server has {have}"
                )
            if name in names:
                raise RequestError(field, f"ControlNet {name!r} is chosen twice")
            kind = c.get("preprocess") or "none"
            if kind == "depth":
                raise RequestError(
                    field, "this server has no depth model: send a depth image (preprocess none)"
                )
            control = Control(
                strength=c.get("strength", 1.0), start=c.get("start", 0.0),
                end=c.get("end", 1.0), control_type=c.get("type"),
                preprocess=Preprocess(
                    kind=kind, canny_low=c.get("canny_low", 100), canny_high=c.get("canny_high", 200)
                ),
            )  # fmt: skip
            try:
                control.check(i)
                component = self.controlnets[name][1]
                resolve_type(component, infer_config(component), control)
                image = preprocess(c["image"], control.preprocess)
            except ValueError as e:
                raise RequestError(field, f"{name}: {e}") from None
            names.append(name)
            controls.append(control)
            images.append(image)
        return tuple(names), tuple(controls), images

    def new_job(
        self,
        given: dict,
        init_image: Image.Image | None = None,
        source: str = "native",
        mask: Image.Image | None = None,
        loras: dict | None = None,
        controls: tuple[tuple[str, ...], tuple[Control, ...], list[Image.Image]] = ((), (), []),
    ) -> Job:
        """A checked job, not yet queued; `controls` as `control_inputs` gives them."""
        names, chosen_controls, control_images = controls
        if names:
            given = {**given, "controls": chosen_controls}
        s = self.settings(given)
        chosen = self.check_loras(loras or {})
        self.check(s, init_image, mask)
        key = None if names else batch_key(self.pipe, s, init_image is not None)
        return Job(
            settings=s,
            init_image=init_image,
            mask_image=mask,
            loras=chosen,
            controlnets=names,
            control_images=control_images,
            source=source,
            batch_key=None if key is None else (*key, chosen),
        )

    def check_model(self, name: str | None, field: str) -> None:
        if name is not None and name not in self.model_names():
            raise RequestError(
                field, f"{field} {name!r} is not served here; this server has {self.model_title!r}"
            )

    @staticmethod
    def decode_base64(data: str, field: str) -> bytes:
        """The bytes of a base64 string or a base64 data: URL, or one RequestError."""
        if not isinstance(data, str) or not data:
            raise RequestError(field, f"{field} must be a base64-encoded image")
        if data.startswith("data:"):
            header, _, data = data.partition(",")
            if not header.endswith(";base64"):
                raise RequestError(field, f"{field}: only base64 data: URLs are read")
        try:
            return base64.b64decode("".join(data.split()), validate=True)
        except (binascii.Error, ValueError):
            raise RequestError(field, f"{field} is not valid base64") from None

    def decode_image(self, data: str, field: str) -> Image.Image:
        """An RGB image from base64 (or a data: URL), its size checked before decoding (a mask's
        alpha, where it has one, is lost: masks are read as grey, white = repaint)."""
        raw = self.decode_base64(data, field)
        try:
            return load_image(
                io.BytesIO(raw), field, self.limits.max_image_pixels, formats=IMAGE_FORMATS
            )
        except ValueError as e:
            raise RequestError(field, str(e)) from None

    # --- jobs -------------------------------------------------------------------------------

    def job_view(self, job_id: str) -> dict | None:
        """A job's public view, from memory while recent, else from the history."""
        job = self.queue.get(job_id)
        if job is not None:
            return job.view(self.queue.position(job))
        stored = self.history.job(job_id)
        if stored is None:
            return None
        seed = stored["settings"]["seed"]
        stored["images"] = [
            {"name": name, "seed": seed + k, "url": f"/v1/images/{name}"}
            for k, name in enumerate(stored["images"])
        ]
        done = stored["state"] == "done"
        steps = stored["settings"]["steps"]
        return {
            **stored, "queue_position": None, "step": steps if done else 0, "steps": steps,
            "progress": 1.0 if done else 0.0, "eta": None,
        }  # fmt: skip

    # --- reading settings back from a PNG ---------------------------------------------------

    def png_info(self, data: str, field: str = "image") -> dict:
        """What a PNG (base64) carries: {"parameters": A1111's text or None, "items": its other
        text chunks, "sd3": `metadata.read_png`'s checked settings or None}. The size is checked
        before anything past the header is read."""
        raw = self.decode_base64(data, field)
        try:
            with Image.open(io.BytesIO(raw), formats=("PNG",)) as image:
                width, height = image.size
                if width * height > self.limits.max_image_pixels:
                    raise RequestError(
                        field, f"{field}: {width}x{height} pixels is more than this server reads"
                    )
                text = dict(image.text)
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            if isinstance(e, RequestError):
                raise
            raise RequestError(field, f"{field}: not a PNG this server can read ({e})") from None
        stored = None
        if "sd3" in text:
            try:
                stored = metadata.read_png(io.BytesIO(raw), where=field)
            except metadata.MetadataError as e:
                raise RequestError(field, str(e)) from None
        parameters = text.pop("parameters", None)
        text.pop("sd3", None)
        return {"parameters": parameters, "items": text, "sd3": stored}
