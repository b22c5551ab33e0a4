"""Text-to-image and image-to-image with SD3 / SD3.5.

prompt -> `text` -> (context, pooled); noise -> `sampling` loop calling the MMDiT on
(x, sigma, context, pooled) -> latent -> `vae.decode` -> image.
"""

import functools
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from tqdm import tqdm

from .checkpoints import (
    CheckpointError,
    Component,
    check_component,
    find_components,
    infer_config,
    load_component,
)
from .kernels.hardware import cpu_has_bf16, warn_if_bf16_is_emulated
from .kernels.quantization import INT8_SCOPE
from .models.mmdit import MMDiT, MMDiTConfig
from .models.vae import AutoEncoder
from .presets import Preset, preset_for
from .sampling import (
    SAMPLERS,
    Callback,
    SkipLayerGuidance,
    cfg_denoiser,
    get_noise,
    get_sigmas,
    noise_latent,
)
from .text import T5_MIN_LENGTH, TextEncoders, Tokenizers

# torch.compile's modes; "reduce-overhead" (and "max-autotune" on a GPU) replay CUDA graphs
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def default_dtype(device: str | torch.device = "cpu") -> torch.dtype:
    """bf16 where the hardware computes it natively, else fp16 on GPUs without bf16, else fp32."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu_has_bf16():
        return torch.bfloat16
    return torch.float32


def available_memory() -> int | None:
    """MemAvailable from /proc/meminfo in bytes (None where unknown)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


@dataclass
class Settings:
    """Everything that determines an image, given the model files."""

    prompt: str
    negative_prompt: str = ""
    steps: int = 28
    cfg: float = 5.0
    cfg_start: float = 0.0  # CFG on steps int(cfg_start * steps) <= step < int(cfg_end * steps)
    cfg_end: float = 1.0
    sampler: str = "euler"
    shift: float = 3.0
    seed: int = 0
    width: int = 1024
    height: int = 1024
    num_images: int = 1
    denoise: float = 1.0
    slg: SkipLayerGuidance | None = None
    t5_length: int | None = None
    use_t5: bool = True

    def to_dict(self) -> dict:
        d = asdict(self)
        if self.slg is not None:
            d["slg"]["layers"] = list(self.slg.layers)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Settings":
        d = dict(d)
        if d.get("slg") is not None:
            slg = dict(d["slg"])
            d["slg"] = SkipLayerGuidance(**{**slg, "layers": tuple(slg["layers"])})
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})


def nearest_multiples(value: int, base: int = 16) -> str:
    lower = max(base, value // base * base)
    return f"{lower} or {lower + base}" if value > base else str(base)


MAX_SEED = 2**63 - 1


def check_settings(s: Settings, config: MMDiTConfig, has_init_image: bool) -> None:
    """One clear ValueError, naming the argument, for each impossible setting."""
    if not isinstance(s.seed, int) or not 0 <= s.seed <= MAX_SEED - max(s.num_images - 1, 0):
        raise ValueError(
            f"seed {s.seed} is out of range: seeds run from 0 to 2**63 - 1, and image i of a "
            f"batch uses seed + i"
        )
    limit = config.pos_embed_max_size * config.patch_size * 8
    for name, value in (("width", s.width), ("height", s.height)):
        if value < 16 or value % 16:
            raise ValueError(
                f"{name} {value} must be a positive multiple of 16: try {nearest_multiples(value)}"
            )
        if value > limit:
            raise ValueError(f"{name} {value} is larger than this model allows ({limit})")
    if not isinstance(s.steps, int) or s.steps < 1:
        raise ValueError(f"steps must be a whole number >= 1, got {s.steps}")
    if not math.isfinite(s.cfg):
        raise ValueError(f"cfg (guidance scale) must be a finite number, got {s.cfg}")
    if not 0 <= s.cfg_start <= s.cfg_end <= 1:
        raise ValueError(
            f"the CFG interval needs 0 <= cfg_start <= cfg_end <= 1, got {s.cfg_start}, {s.cfg_end}"
        )
    if not (math.isfinite(s.shift) and s.shift > 0):
        raise ValueError(f"shift must be a finite number > 0, got {s.shift}")
    if s.sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {s.sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if not (math.isfinite(s.denoise) and 0 < s.denoise <= 1):
        raise ValueError(f"denoise must be in (0, 1], got {s.denoise}")
    if s.denoise < 1 and not has_init_image:
        raise ValueError(f"denoise {s.denoise} needs an init image (img2img)")
    if has_init_image and int(s.steps * (1 - s.denoise)) == 0:
        # the first step would start from pure noise: the init image would change nothing
        fix = (
            f"use at least {math.ceil(1 / (1 - s.denoise))} steps or a lower denoise"
            if s.denoise < 1
            else "use a denoise below 1"
        )
        raise ValueError(
            f"denoise {s.denoise} with {s.steps} steps starts from pure noise, so the init image "
            f"would have no effect: {fix}"
        )
    if s.num_images < 1:
        raise ValueError(f"the number of images must be >= 1, got {s.num_images}")
    if s.t5_length is not None and s.t5_length < 1:
        raise ValueError(f"t5_length must be >= 1, got {s.t5_length}")
    if s.slg is not None:
        bad = [i for i in s.slg.layers if not 0 <= i < config.depth]
        if bad:
            raise ValueError(
                f"skip-layer guidance layers {bad} do not exist (the MMDiT has {config.depth})"
            )
        if not math.isfinite(s.slg.scale) or not 0 <= s.slg.start <= s.slg.end <= 1:
            raise ValueError(
                f"skip-layer guidance needs a finite scale and 0 <= start <= end <= 1, got {s.slg}"
            )


def to_image_tensor(image: Image.Image, width: int, height: int) -> Tensor:
    """PIL image -> [1, 3, H, W] in [-1, 1], resized to width x height."""
    image = image.convert("RGB")
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.LANCZOS)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1)[None]


def to_pil(images: Tensor) -> list[Image.Image]:
    """[B, 3, H, W] in [-1, 1] -> PIL images."""
    array = ((images.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    return [Image.fromarray(a.permute(1, 2, 0).numpy()) for a in array]


@dataclass
class Pipeline:
    """The networks and how to run them. Build with `from_single_file` or `from_pretrained`.

    Each network is loaded from its component on first use (`module`). With `low_memory` the
    order is the one that keeps the peak lowest: the text encoders first, released (modules and
    file pages) once the prompt is encoded, then the MMDiT, released in turn before the VAE
    decodes; each call loads them again (from the page cache, when it still holds the files).
    Otherwise the MMDiT and VAE load at once and the encoders stay loaded between calls."""

    components: dict[str, Component]
    tokenizers: Tokenizers
    preset: Preset
    dtype: torch.dtype = torch.float32
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    low_memory: bool = False
    int8: bool = False  # int8 T5-XXL and MMDiT blocks (`kernels.quantization`)
    # the MMDiT under torch.compile, which pays off on GPUs after a first step that compiles
    # (benchmarks/RESULTS.md); True is torch.compile's default
    # mode, a string one of COMPILE_MODES
    compile: bool | str = False
    model_name: str = ""
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage of the last call
    # a tqdm bar over the denoising steps, started once the prompt is encoded
    progress: bool = False
    _modules: dict[str, nn.Module] = field(default_factory=dict)
    _text: TextEncoders | None = None

    @classmethod
    def from_single_file(
        cls,
        path: str | Path | None,
        clip_l: str | Path | None = None,
        clip_g: str | Path | None = None,
        t5xxl: str | Path | None = None,
        vae: str | Path | None = None,
        dtype: torch.dtype | None = None,
        device: str | torch.device = "cpu",
        low_memory: bool | None = None,
        int8: bool = False,
        compile: bool | str = False,
        load: bool = True,
    ) -> "Pipeline":
        """A Stability single file (encoders bundled or given separately) or a diffusers folder.
        Every file's keys and shapes are checked first; `load=False` leaves reading the weights
        to `load()` or first use, so settings can be checked against the model before."""
        components = find_components(path, clip_l=clip_l, clip_g=clip_g, t5xxl=t5xxl, vae=vae)
        folder = path is not None and Path(path).is_dir()
        tokenizers = Tokenizers.from_folder(path) if folder else Tokenizers.default()
        return cls.from_components(
            components, tokenizers, dtype, device, low_memory, str(path or ""), int8, compile, load
        )

    from_pretrained = from_single_file  # a diffusers folder, in diffusers' vocabulary

    @classmethod
    def from_components(
        cls,
        components: dict[str, Component],
        tokenizers: Tokenizers,
        dtype: torch.dtype | None = None,
        device: str | torch.device = "cpu",
        low_memory: bool | None = None,
        model_name: str = "",
        int8: bool = False,
        compile: bool | str = False,
        load: bool = True,
    ) -> "Pipeline":
        """`low_memory=None` turns it on when all weights in `dtype` (int8 where `int8` quantizes
        them) need over 60% of the free memory."""
        if not isinstance(compile, bool) and compile not in COMPILE_MODES:
            raise ValueError(
                f"compile must be True, False or one of {COMPILE_MODES}, got {compile!r}"
            )
        for name, option in (
            ("mmdit", "the model file"),
            ("vae", "--vae"),
            ("clip_l", "--clip-l"),
            ("clip_g", "--clip-g"),
        ):
            if name not in components:
                where = model_name or "the given files"
                raise CheckpointError(f"{where}: no {name} found; give it with {option}")
        for component in components.values():
            check_component(component)  # every key and shape, before any weight is read
        device = torch.device(device)
        dtype = dtype or default_dtype(device)
        if dtype == torch.bfloat16 and device.type == "cpu":
            warn_if_bf16_is_emulated("bf16 on the CPU")
        if low_memory is None:
            needed = sum(
                c.num_params * (1 if int8 and name in INT8_SCOPE else dtype.itemsize)
                for name, c in components.items()
            )
            free = available_memory()
            low_memory = free is not None and needed > 0.6 * free
        config = infer_config(components["mmdit"])
        pipe = cls(
            components=components,
            tokenizers=tokenizers,
            preset=preset_for(config, model_name, components["mmdit"].metadata),
            dtype=dtype,
            device=device,
            low_memory=low_memory,
            int8=int8,
            compile=compile,
            model_name=model_name,
        )
        if load:
            pipe.load()
        return pipe

    def load(self) -> None:
        """Read the MMDiT's and the VAE's weights now (in low-memory mode each loads when used)."""
        if not self.low_memory:
            self.module("mmdit")
            self.module("vae")

    # --- loading and releasing ------------------------------------------------------------

    def module(self, name: str) -> nn.Module:
        """The network for component `name` ("mmdit", "vae", "clip_l", ...), loaded on first use."""
        if name not in self._modules:
            int8 = self.int8 and name in INT8_SCOPE
            module = load_component(self.components[name], self.dtype, self.device, int8)
            if name == "mmdit" and self.compile:  # compiles on its first call
                mode = self.compile if isinstance(self.compile, str) else None
                module = torch.compile(module, dynamic=False, mode=mode)
            self._modules[name] = module
        return self._modules[name]

    def release(self, *names: str) -> None:
        """Drop these networks and their file pages from memory; they reload on next use."""
        for name in names:
            self._modules.pop(name, None)
            if name in self.components:
                self.components[name].release()

    @property
    def mmdit(self) -> MMDiT:
        return self.module("mmdit")

    @property
    def vae(self) -> AutoEncoder:
        return self.module("vae")

    @functools.cached_property
    def config(self) -> MMDiTConfig:
        """The MMDiT's configuration, known without loading it."""
        return infer_config(self.components["mmdit"])

    # --- the three stages ---------------------------------------------------------------

    def text_encoders(self, use_t5: bool = True, t5_length: int | None = None) -> TextEncoders:
        """The conditioning stack, loaded on first use (and again after a low-memory release)."""
        want_t5 = use_t5 and "t5xxl" in self.components
        if self._text is None or (self._text.t5 is not None) != want_t5:
            if not want_t5:
                self.release("t5xxl")
            self._text = TextEncoders(
                self.module("clip_l"),
                self.module("clip_g"),
                self.module("t5xxl") if want_t5 else None,
                self.tokenizers,
                context_width=self.config.context_dim,
                clip_length=self.preset.clip_length,
            )
        self._text.t5_length = t5_length
        return self._text

    def text_length(self, s: Settings) -> int:
        """The T5 positions of the conditioning `encode_prompt(s)` gives: requests whose lengths
        agree can be denoised as one batch and still get the images they would get alone."""
        if s.use_t5 and "t5xxl" in self.components:
            return self.tokenizers.t5.length([s.prompt, s.negative_prompt], s.t5_length)
        return s.t5_length or T5_MIN_LENGTH

    def encode_prompt(self, s: Settings) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(context, pooled, negative context, negative pooled); both prompts in one call so their
        T5 lengths agree."""
        text = self.text_encoders(s.use_t5, s.t5_length)
        with torch.no_grad():
            context, pooled = text.encode([s.prompt, s.negative_prompt])
        if self.low_memory:
            self._text = None
            self.release("clip_l", "clip_g", "t5xxl")
        return context[:1], pooled[:1], context[1:], pooled[1:]

    def velocity(
        self, x: Tensor, timestep: Tensor, context: Tensor, pooled: Tensor, skip_layers=()
    ) -> Tensor:
        """The MMDiT in its compute dtype; the sampler keeps x in fp32."""
        v = self.mmdit(
            x.to(self.dtype), timestep, context.to(self.dtype), pooled.to(self.dtype), skip_layers
        )
        return v.float()

    def sample(
        self,
        s: Settings,
        init_image: Image.Image | None = None,
        callback: Callback | None = None,
        conditioning: tuple[Tensor, Tensor, Tensor, Tensor] | None = None,
    ) -> Tensor:
        """The final latents [N, 16, H/8, W/8] in the MMDiT's latent format."""
        check_settings(s, self.config, init_image is not None)
        return self._denoise(s, init_image, callback, conditioning or self.encode_prompt(s))

    def _denoise(
        self,
        s: Settings,
        init_image: Image.Image | None,
        callback: Callback | None,
        conditioning: tuple[Tensor, Tensor, Tensor, Tensor],
        noise: Tensor | None = None,
    ) -> Tensor:
        """`sample` after the settings are checked and the prompt encoded; `noise` replaces the
        one drawn from `s.seed` (a batch of several requests, each with its own seeds)."""
        context, pooled, neg_context, neg_pooled = conditioning
        sigmas = get_sigmas(s.steps, s.shift, s.denoise).to(self.device)
        shape = (s.num_images, 16, s.height // 8, s.width // 8)
        if noise is not None and tuple(noise.shape) != shape:
            raise ValueError(f"noise of shape {tuple(noise.shape)} does not fit {shape}")
        if noise is None:
            noise = get_noise(s.seed, s.num_images, s.height, s.width)
        x = noise.to(self.device)
        if init_image is not None:
            with torch.no_grad():
                image = to_image_tensor(init_image, s.width, s.height).to(self.device, self.dtype)
                latent = self.vae.encode(image).float()
            x = noise_latent(latent, x, sigmas[0])
        denoiser = cfg_denoiser(
            self.velocity,
            context,
            pooled,
            neg_context,
            neg_pooled,
            guidance_scale=s.cfg,
            slg=s.slg,
            steps=s.steps,
            cfg_start=s.cfg_start,
            cfg_end=s.cfg_end,
        )
        with torch.no_grad(), self.mmdit.temporaries():
            return SAMPLERS[s.sampler](
                denoiser,
                x,
                sigmas,
                generator=torch.Generator().manual_seed(s.seed),
                callback=callback,
            )

    def decode(self, latents: Tensor, tile_size: int | None = None) -> list[Image.Image]:
        """Latents -> PIL images; large images decode in tiles unless `tile_size` says otherwise."""
        if tile_size is None and latents.shape[-1] * latents.shape[-2] > 128 * 128:
            tile_size = 64
        with torch.no_grad():
            return [
                to_pil(
                    self.vae.decode(latent[None].to(self.device, self.dtype), tile_size=tile_size)
                )[0]
                for latent in latents
            ]

    # --- diffusers-style entry point ------------------------------------------------------

    def settings(self, prompt: str, **overrides) -> Settings:
        """Settings for `prompt`: the model's preset, with `overrides` (Settings field names)."""
        p = self.preset
        base = Settings(
            prompt=prompt, steps=p.steps, cfg=p.cfg, cfg_start=p.cfg_start, cfg_end=p.cfg_end,
            sampler=p.sampler, shift=p.shift, width=p.size, height=p.size, slg=p.slg,
            t5_length=p.t5_length,
        )  # fmt: skip
        return replace(base, **{k: v for k, v in overrides.items() if v is not None})

    def __call__(
        self,
        prompt: str,
        negative_prompt: str = "",
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        cfg_start: float | None = None,
        cfg_end: float | None = None,
        sampler: str | None = None,
        shift: float | None = None,
        seed: int = 0,
        width: int | None = None,
        height: int | None = None,
        num_images: int = 1,
        init_image: Image.Image | str | Path | None = None,
        denoise: float | None = None,
        skip_layer_guidance: SkipLayerGuidance | None | bool = True,
        t5_length: int | None = None,
        use_t5: bool = True,
        callback: Callback | None = None,
    ) -> list[Image.Image]:
        """Generate images. `skip_layer_guidance`: True keeps the preset's, False/None turns it
        off, or give a SkipLayerGuidance."""
        slg = self.preset.slg if skip_layer_guidance is True else skip_layer_guidance or None
        s = self.settings(
            prompt, negative_prompt=negative_prompt, steps=num_inference_steps, cfg=guidance_scale,
            cfg_start=cfg_start, cfg_end=cfg_end, sampler=sampler, shift=shift, seed=seed,
            width=width, height=height, num_images=num_images, denoise=denoise,
            t5_length=t5_length, use_t5=use_t5,
        )  # fmt: skip
        s = replace(s, slg=slg)
        if isinstance(init_image, str | Path):
            init_image = load_image(init_image)
        return self.generate(s, init_image, callback)[1]

    def generate(
        self,
        s: Settings,
        init_image: Image.Image | None = None,
        callback: Callback | None = None,
        conditioning: tuple[Tensor, Tensor, Tensor, Tensor] | None = None,
        noise: Tensor | None = None,
    ) -> tuple[Tensor, list[Image.Image]]:
        """Encode, denoise, decode -> (latents, images); records each stage's seconds in
        `timings`. The prompt is encoded before the first step, so per-step times are the
        denoiser's alone; with `compile`, `compile` is the first step's time beyond the others'
        and `per_step` leaves the first step out. `conditioning` (as `encode_prompt` returns it,
        one row per image or one for all) and `noise` ([num_images, 16, H/8, W/8]) replace the
        prompt's and the seed's: several requests denoised as one batch (`sd3.serve`)."""
        check_settings(s, self.config, init_image is not None)
        started = time.perf_counter()
        if conditioning is None:
            conditioning = self.encode_prompt(s)
        encoded = time.perf_counter()
        first_step_done = []
        with tqdm(total=s.steps, desc="denoising", unit="step", disable=not self.progress) as bar:

            def step(*args) -> None:
                if self.compile and not first_step_done:
                    first_step_done.append(time.perf_counter())
                bar.update(1)
                if callback is not None:
                    callback(*args)

            latents = self._denoise(s, init_image, step, conditioning, noise)
            # a GPU's steps are queued: wait for them, so the time is theirs, not the queueing's
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
        if self.low_memory:
            self.release("mmdit")
        sampled = time.perf_counter()
        images = self.decode(latents)
        self.timings = {
            "text": encoded - started,
            "denoise": sampled - encoded,
            "per_step": (sampled - encoded) / s.steps,
            "decode": time.perf_counter() - sampled,
        }
        if first_step_done and s.steps > 1:
            first = first_step_done[0] - encoded
            self.timings["per_step"] = (sampled - first_step_done[0]) / (s.steps - 1)
            self.timings["compile"] = max(first - self.timings["per_step"], 0.0)
        return latents, images


def describe_timings(timings: dict[str, float]) -> str:
    """One line: where a generation's time went."""
    return (
        f"text encoders {timings['text']:.1f}s, denoising {timings['denoise']:.1f}s "
        f"({timings['per_step']:.2f}s per step"
        + (f", after {timings['compile']:.1f}s compiling" if "compile" in timings else "")
        + f"), decode {timings['decode']:.1f}s"
    )


MAX_IMAGE_PIXELS = 1 << 26  # 8192 x 8192: larger inputs are refused before they are decoded


def load_image(
    path: str | Path | BinaryIO,
    option: str = "image",
    max_pixels: int = MAX_IMAGE_PIXELS,
    formats: tuple[str, ...] | None = None,
) -> Image.Image:
    """An RGB image from a file (or an open binary file: bytes a client sent), or one ValueError
    naming `option` and the file: the size is checked from the header before decoding, and 16-bit
    and float images are scaled to 8 bits, not clipped. `formats` limits the decoders tried
    (PIL's names: "PNG", "JPEG", ...)."""
    where = f"{option} {path}" if isinstance(path, str | Path) else option
    try:
        with Image.open(path, formats=formats) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise ValueError(f"{width}x{height} pixels is more than sd3 reads ({max_pixels:,})")
            image.load()
            return to_rgb(image)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"{where}: cannot read the image ({e})") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB: 16-bit integer images (PNG's "I;16" and "I") scaled by 255/65535, float ones
    ("F") read as 0..1, everything else through PIL's own conversion."""
    if image.mode.startswith("I;16") or image.mode == "I":
        array = np.asarray(image, dtype=np.float64) * (255 / 65535)
    elif image.mode == "F":
        array = np.asarray(image, dtype=np.float64) * 255
    else:
        return image.convert("RGB")
    grey = Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8), mode="L")
    return grey.convert("RGB")
