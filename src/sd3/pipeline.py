"""Text-to-image and image-to-image with SD3 / SD3.5.

prompt -> `text` -> (context, pooled); noise -> `sampling` loop calling the MMDiT on
(x, sigma, context, pooled) -> latent -> `vae.decode` -> image.
"""

import functools
import math
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from tqdm import tqdm

from . import inpainting
from .checkpoints import (
    CheckpointError,
    Component,
    check_component,
    find_components,
    infer_config,
    load_component,
    open_controlnet,
)
from .control import Control, check_fit, control_latent, control_pixels, resolve_type
from .inpainting import Inpaint, outpaint_size
from .kernels.hardware import cpu_has_bf16, warn_if_bf16_is_emulated
from .kernels.quantization import INT8_SCOPE
from .loras import LoRA, LoRAError, LoRAFile, layers_of, match, merge_edits
from .loras.apply import install
from .loras.weights import adapted_layers, remove_adapted
from .models.controlnet import SD35, ControlNet
from .models.mmdit import MMDiT, MMDiTConfig
from .models.vae import AutoEncoder
from .presets import PRESET_METADATA, PRESETS, Preset, preset_for, stored_preset
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
TEXT_COMPONENTS = ("clip_l", "clip_g", "t5xxl")


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
    inpaint: Inpaint | None = None  # a masked generation: repaint where the mask is white
    controls: tuple[Control, ...] = ()  # one per ControlNet, in the pipeline's order

    def to_dict(self) -> dict:
        d = asdict(self)
        if self.slg is not None:
            d["slg"]["layers"] = list(self.slg.layers)
        return d


def nearest_multiples(value: int, base: int = 16) -> str:
    lower = max(base, value // base * base)
    return f"{lower} or {lower + base}" if value > base else str(base)


MAX_SEED = 2**63 - 1


def check_settings(
    s: Settings, config: MMDiTConfig, has_init_image: bool, has_mask: bool = False
) -> None:
    """One clear ValueError, naming the argument, for each impossible setting."""
    if has_mask and s.inpaint is None:
        raise ValueError("a mask needs inpainting settings (Settings.inpaint)")
    if s.inpaint is not None:
        if not has_init_image:
            raise ValueError("inpainting and outpainting need an init image")
        s.inpaint.check(has_mask)
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
    if has_init_image and s.inpaint is None and int(s.steps * (1 - s.denoise)) == 0:
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
    for i, control in enumerate(s.controls):
        control.check(i)
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


def check_seeds(seeds: Sequence[int], num_images: int) -> None:
    """One ValueError for per-image seeds that do not fit the batch or the seed range."""
    if len(seeds) != num_images:
        raise ValueError(f"{len(seeds)} seeds for {num_images} images: give one seed per image")
    bad = [
        k for k in seeds if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= MAX_SEED
    ]
    if bad:
        raise ValueError(f"seeds {bad[:3]} are out of range: seeds run from 0 to 2**63 - 1")


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
    Otherwise the MMDiT and VAE load at once and the encoders stay loaded between calls.

    LoRAs (`sd3.loras`, any of the formats SD3 tools write) apply merged into the weights as they
    load (`loras=` when built, or `add_lora`): no cost per step, int8 quantizing the merged
    weights; or beside the loaded weights (`load_lora`), so that `set_lora_scales` and
    `unload_loras` change them without loading the model again."""

    components: dict[str, Component]
    tokenizers: Tokenizers
    preset: Preset
    dtype: torch.dtype = torch.float32
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    low_memory: bool = False
    int8: bool = False  # int8 T5-XXL and MMDiT blocks (`kernels.quantization`)
    int4: bool = False  # int4 (Q4_0-style groups of 32) for the same layers
    # the MMDiT under torch.compile, which pays off on GPUs after a first step that compiles
    # (benchmarks/RESULTS.md); True is torch.compile's default
    # mode, a string one of COMPILE_MODES
    compile: bool | str = False
    model_name: str = ""
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage of the last call
    # a tqdm bar over the denoising steps, started once the prompt is encoded
    progress: bool = False
    loras: list[LoRA] = field(default_factory=list)  # in the order they apply
    controlnets: list[Component] = field(default_factory=list)  # `load_controlnet`
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
        loras: Iterable[tuple[str | Path, float]] = (),
        controlnets: Iterable[str | Path] = (),
        int4: bool = False,
    ) -> "Pipeline":
        """A Stability single file (encoders bundled or given separately) or a diffusers folder,
        and any ControlNet files or folders; any file may be GGUF. Every file's keys and shapes are checked first;
        `load=False` leaves reading the weights to `load()` or first use, so settings can be
        checked against the model before. `loras`: (file, strength) pairs merged into the
        weights as they load, each matched against the model first (`add_lora`)."""
        components = find_components(path, clip_l=clip_l, clip_g=clip_g, t5xxl=t5xxl, vae=vae)
        folder = path is not None and Path(path).is_dir()
        tokenizers = Tokenizers.from_folder(path) if folder else Tokenizers.default()
        pipe = cls.from_components(
            components, tokenizers, dtype, device, low_memory, str(path or ""), int8, compile,
            load=False, loras=loras, int4=int4,
        )  # fmt: skip
        for controlnet in controlnets:
            pipe.load_controlnet(controlnet)
        if load:
            pipe.load()
        return pipe

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
        loras: Iterable[tuple[str | Path, float]] = (),
        int4: bool = False,
    ) -> "Pipeline":
        """`low_memory=None` turns it on when all weights in `dtype` (int8 or int4 where `int8`
        or `int4` quantizes them) need over 60% of the free memory."""
        if int8 and int4:
            raise ValueError("int8 and int4 exclude each other: choose one")
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
            low_bit = 1 if int8 else 4.5 / 8 if int4 else None  # bytes a quantized weight
            needed = sum(
                c.num_params * (low_bit if low_bit and name in INT8_SCOPE else dtype.itemsize)
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
            int4=int4,
            compile=compile,
            model_name=model_name,
        )
        for lora_path, scale in loras:
            pipe.add_lora(lora_path, scale)
        if load:
            pipe.load()
        return pipe

    def load(self) -> None:
        """Read the MMDiT's, the VAE's and the ControlNets' weights now (in low-memory mode each
        loads when used)."""
        if not self.low_memory:
            self.module("mmdit")
            self.module("vae")
            for i in range(len(self.controlnets)):
                self.controlnet(i)

    def load_controlnet(self, path: str | Path) -> Component:
        """Add a ControlNet (file or diffusers folder): its keys and shapes are checked and it
        must fit the MMDiT; the weights are read on first use. An SD3.5 ControlNet that records
        its control type brings the reference's defaults for it (`presets`)."""
        component = open_controlnet(path)
        config = check_fit(component, self.config, self.model_name)
        self.controlnets.append(component)
        if PRESET_METADATA in component.metadata:  # the preset of the model it was made for
            self.preset = stored_preset(component.metadata[PRESET_METADATA], str(path))
        elif config.kind == SD35 and component.control_type is not None:
            self.preset = PRESETS[f"sd3.5_large_controlnet_{component.control_type}"]
        return component

    def controlnet(self, index: int) -> ControlNet:
        """ControlNet `index` (in the order they were added), loaded on first use."""
        name = f"controlnet.{index}"
        if name not in self._modules:
            int8 = self.int8  # --int8/--int4 cover the ControlNet's blocks as the MMDiT's
            self._modules[name] = load_component(
                self.controlnets[index], self.dtype, self.device, int8, int4=self.int4
            )
        return self._modules[name]

    # --- loading and releasing ------------------------------------------------------------

    def module(self, name: str) -> nn.Module:
        """The network for component `name` ("mmdit", "vae", "clip_l", ...), loaded on first use."""
        if name not in self._modules:
            int8 = self.int8 and name in INT8_SCOPE
            int4 = self.int4 and name in INT8_SCOPE
            edits = merge_edits(self.loras, name)
            module = load_component(
                self.components[name], self.dtype, self.device, int8, edits, int4
            )
            if any(not lora.merged and name in lora.matches for lora in self.loras):
                install(module, name, self.loras, self.dtype, self.device)
            if name == "mmdit" and self.compile:  # compiles on its first call
                mode = self.compile if isinstance(self.compile, str) else None
                module = torch.compile(module, dynamic=False, mode=mode)
            self._modules[name] = module
        return self._modules[name]

    def release(self, *names: str) -> None:
        """Drop these networks and their file pages from memory; they reload on next use
        ("controlnet" releases every ControlNet)."""
        for name in names:
            if name == "controlnet":
                for i, component in enumerate(self.controlnets):
                    self._modules.pop(f"controlnet.{i}", None)
                    component.release()
                continue
            self._modules.pop(name, None)
            if name in self.components:
                self.components[name].release()
            if name in TEXT_COMPONENTS:
                self._text = None

    # --- LoRA -------------------------------------------------------------------------------

    @functools.cached_property
    def layers(self) -> dict[str, dict[str, tuple[int, ...]]]:
        """Each network's linear and convolution layers with their weight shapes (what a LoRA
        can change), known from the files without reading a weight."""
        return {
            name: layers_of(check_component(c))
            for name, c in self.components.items()
            if name != "vae"
        }

    def add_lora(self, path: str | Path, scale: float = 1.0, merge: bool = True) -> LoRA:
        """Apply the LoRA file `path` at strength `scale`, after the last one added: merged into
        the weights as they load (a network already loaded loads again, merged, on next use), or
        with `merge=False` beside the loaded weights (`load_lora`). Every module is matched
        against the model first: LoRAError where none applies or a width differs, a warning
        where some do not apply."""
        file = LoRAFile.open(path)
        if not merge and file.has_dora:
            raise LoRAError(
                f"{file.path}: a DoRA LoRA changes each weight's norm, so it can only be merged: "
                "pass it to from_single_file(loras=...) or add_lora(...) instead"
            )
        lora = match(file, self.layers, self.config.depth, self.preset.name, scale, merge)
        self.loras.append(lora)
        for name in lora.matches:
            if name in self._modules:
                if merge:
                    self.release(name)
                else:
                    install(self._modules[name], name, self.loras, self.dtype, self.device)
        return lora

    def load_lora(self, path: str | Path, scale: float = 1.0) -> LoRA:
        """Run the LoRA file `path` beside the weights, not merged (two thin matrix products more
        per adapted layer), so that a long-running process can change it (`set_lora_scales`) or
        drop it (`unload_loras`) without loading the model again."""
        return self.add_lora(path, scale, merge=False)

    def set_lora_scales(self, scales: Mapping[str, float] | Sequence[float]) -> None:
        """New strengths, by LoRA name (its file name without the extension) or as a list in
        the order the LoRAs were added. Not-merged LoRAs take them at once; the networks a merged
        LoRA changes load again, merged anew, on next use."""
        if isinstance(scales, Mapping):
            new = {}
            for name, scale in scales.items():
                found = [lo for lo in self.loras if lo.name == name]
                if len(found) != 1:
                    known = [lo.name for lo in self.loras]
                    why = "is not loaded" if not found else "is loaded more than once"
                    raise LoRAError(f"LoRA {name!r} {why}; the LoRAs are {known}")
                new[id(found[0])] = scale
        else:
            if len(scales) != len(self.loras):
                raise LoRAError(f"{len(scales)} scales given for {len(self.loras)} LoRAs")
            new = {id(lo): scale for lo, scale in zip(self.loras, scales, strict=True)}
        for lora in self.loras:
            scale = new.get(id(lora), lora.scale)
            if not math.isfinite(scale):
                raise LoRAError(f"LoRA {lora.name}: the scale must be a finite number, got {scale}")
        for lora in self.loras:
            if id(lora) in new and new[id(lora)] != lora.scale:
                lora.scale = new[id(lora)]
                if lora.merged:
                    self.release(*[n for n in lora.matches if n in self._modules])
        for module in self._modules.values():
            for layer in adapted_layers(getattr(module, "_orig_mod", module)).values():
                layer.refresh()

    def unload_loras(self) -> None:
        """Remove every LoRA: not-merged ones at once, merged ones by loading the networks they
        changed again on next use."""
        merged = {n for lo in self.loras if lo.merged for n in lo.matches}
        self.loras = []
        self.release(*[n for n in merged if n in self._modules])
        for module in self._modules.values():
            remove_adapted(getattr(module, "_orig_mod", module))

    def check_loras(self, use_t5: bool = True) -> None:
        """With T5 left out, a LoRA's T5-XXL modules cannot apply: a warning, or a LoRAError
        where nothing else of it would."""
        if use_t5:
            return
        for lora in self.loras:
            n = lora.matched("t5xxl")
            if n and n == lora.matched():
                raise LoRAError(
                    f"{lora.path}: {lora.format} changes only T5-XXL, which is left out (use_t5 "
                    "off / --no-t5): it would have no effect"
                )
            if n:
                warnings.warn(
                    f"{lora.path}: its {n} T5-XXL modules do not apply, since T5 is left out",
                    stacklevel=2,
                )

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
        self,
        x: Tensor,
        timestep: Tensor,
        context: Tensor,
        pooled: Tensor,
        skip_layers=(),
        controls: list[tuple[int, Tensor, float]] = (),
    ) -> Tensor:
        """The MMDiT in its compute dtype; the sampler keeps x in fp32. `controls`: (ControlNet
        index, control latent, strength) of the ControlNets active on this step; they see the
        same inputs as the MMDiT. A skip-layer pass runs without them, as Stability's reference
        runs it."""
        x, context, pooled = x.to(self.dtype), context.to(self.dtype), pooled.to(self.dtype)
        residuals = [
            self.controlnet(i)(self.mmdit, x, timestep, context, pooled, latent, strength)
            for i, latent, strength in (() if skip_layers else controls)
        ]
        return self.mmdit(x, timestep, context, pooled, skip_layers, residuals).float()

    def check_controls(self, s: Settings, n_images: int) -> list[str | None]:
        """The control type of each ControlNet, or one ValueError: as many control images and
        Controls (or none: defaults) as ControlNets, and a type for each SD3.5 ControlNet."""
        if n_images != len(self.controlnets):
            raise ValueError(
                f"{len(self.controlnets)} ControlNets need as many control images, got {n_images}"
            )
        if s.controls and len(s.controls) != len(self.controlnets):
            raise ValueError(
                f"{len(self.controlnets)} ControlNets need as many Controls in the settings, got "
                f"{len(s.controls)}"
            )
        controls = s.controls or tuple(Control() for _ in self.controlnets)
        return [
            resolve_type(component, infer_config(component), control)
            for component, control in zip(self.controlnets, controls, strict=True)
        ]

    def control_latents(
        self, s: Settings, control_images: list[Image.Image]
    ) -> list[tuple[Control, Tensor]]:
        """Each ControlNet's Control and its encoded control image (already preprocessed)."""
        types = self.check_controls(s, len(control_images))
        controls = s.controls or tuple(Control() for _ in self.controlnets)
        out = []
        for component, control, image, control_type in zip(
            self.controlnets, controls, control_images, types, strict=True
        ):
            kind = infer_config(component).kind
            pixels = control_pixels(image, s.width, s.height, control_type, kind)
            latent = control_latent(self.vae, pixels.to(self.device, self.dtype), kind)
            out.append((control, latent))
        return out

    def sample(
        self,
        s: Settings,
        init_image: Image.Image | None = None,
        callback: Callback | None = None,
        conditioning: tuple[Tensor, Tensor, Tensor, Tensor] | None = None,
        control_images: list[Image.Image] = (),
        seeds: Sequence[int] | None = None,
    ) -> Tensor:
        """The final latents [N, 16, H/8, W/8] in the MMDiT's latent format. `seeds`, one per
        image, replace seed + i: a batch of prompts whose images are each the image made alone."""
        check_settings(s, self.config, init_image is not None)
        if seeds is not None:
            check_seeds(seeds, s.num_images)
        if s.inpaint is not None:
            raise ValueError("masked generations run through `generate`, which also pastes back")
        self.check_loras(s.use_t5)
        controls = self.control_latents(s, list(control_images))
        return self._denoise(
            s,
            init_image,
            callback,
            conditioning or self.encode_prompt(s),
            controls=controls,
            seeds=seeds,
        )

    def _denoise(
        self,
        s: Settings,
        init_image: Image.Image | None,
        callback: Callback | None,
        conditioning: tuple[Tensor, Tensor, Tensor, Tensor],
        mask: Tensor | None = None,
        controls: list[tuple[Control, Tensor]] = (),
        seeds: Sequence[int] | None = None,
    ) -> Tensor:
        """`sample` after the settings are checked and the prompt encoded; with a latent `mask`
        (1 = repaint), the masked blend of `inpainting`; with `controls`, the ControlNets';
        `seeds` (one per image, else seed + i) draw the noise and the samplers' noise."""
        seeds = list(seeds) if seeds is not None else [s.seed + i for i in range(s.num_images)]
        context, pooled, neg_context, neg_pooled = conditioning
        sigmas = get_sigmas(s.steps, s.shift, s.denoise).to(self.device)
        x = noise = get_noise(seeds, s.num_images, s.height, s.width).to(self.device)
        if init_image is not None:
            with torch.no_grad():
                image = to_image_tensor(init_image, s.width, s.height).to(self.device, self.dtype)
                latent = self.vae.encode(image).float()
            x = noise_latent(latent, noise, sigmas[0])

        def guided(velocity):
            return cfg_denoiser(
                velocity,
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

        denoiser = guided(self.velocity)
        if controls:
            steps_run = len(sigmas) - 1

            def denoiser(x: Tensor, sigma: Tensor, step: int) -> Tensor:
                on = [
                    (i, latent, control.strength)
                    for i, (control, latent) in enumerate(controls)
                    if control.active(step, steps_run)
                ]
                return guided(functools.partial(self.velocity, controls=on))(x, sigma, step)

        if mask is not None:
            mask = mask.to(self.device)
            denoiser = inpainting.masked_denoiser(denoiser, latent, noise, mask, sigmas)
        with torch.no_grad(), self.mmdit.temporaries():
            x = SAMPLERS[s.sampler](
                denoiser,
                x,
                sigmas,
                generator=[torch.Generator().manual_seed(k) for k in seeds],
                callback=callback,
            )
        return x if mask is None else inpainting.hold(x, latent, mask, sigmas)

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
        mask_image: Image.Image | str | Path | None = None,
        mask_blur: float = 0.0,
        mask_grow: int = 0,
        paste_back: bool = True,
        padding_mask_crop: int | None = None,
        outpaint: tuple[int, int, int, int] | None = None,
        outpaint_fill: str = "edge-noise",
        control_images: Image.Image | str | Path | list | None = None,
        control_strength: float | list[float] = 1.0,
        control_start: float | list[float] = 0.0,
        control_end: float | list[float] = 1.0,
        control_type: str | None | list[str | None] = None,
    ) -> list[Image.Image]:
        """Generate images. `skip_layer_guidance`: True keeps the preset's, False/None turns it
        off, or give a SkipLayerGuidance. With `mask_image` (white = repaint) or `outpaint`
        (pixels added left, top, right, bottom) an `init_image` is inpainted (`inpainting`).
        `control_images`: one per loaded ControlNet (`load_controlnet`), already preprocessed
        (`sd3.preprocess`); the control options take one value for all or a list, one each."""
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
        if isinstance(mask_image, str | Path):
            mask_image = load_image(mask_image, "mask")
        if mask_image is not None or outpaint is not None:
            inpaint = Inpaint(
                mask_blur, mask_grow, paste_back, padding_mask_crop, outpaint, outpaint_fill
            )
            s = replace(s, inpaint=inpaint)
            if outpaint is not None and init_image is not None:
                s = replace(
                    s,
                    **dict(
                        zip(
                            ("width", "height"),
                            outpaint_size(init_image.size, outpaint),
                            strict=True,
                        )
                    ),
                )
        if control_images is not None and not isinstance(control_images, list | tuple):
            control_images = [control_images]
        control_images = [
            load_image(im, "control image") if isinstance(im, str | Path) else im
            for im in control_images or ()
        ]
        n = len(self.controlnets)

        def each(value, name):
            values = list(value) if isinstance(value, list | tuple) else [value] * n
            if len(values) != n:
                raise ValueError(f"{name}: {len(values)} values for {n} ControlNets")
            return values

        s = replace(
            s,
            controls=tuple(
                Control(*fields)
                for fields in zip(
                    each(control_strength, "control_strength"),
                    each(control_start, "control_start"),
                    each(control_end, "control_end"),
                    each(control_type, "control_type"),
                    strict=True,
                )
            ),
        )
        return self.generate(s, init_image, callback, mask_image, control_images)[1]

    def generate(
        self,
        s: Settings,
        init_image: Image.Image | None = None,
        callback: Callback | None = None,
        mask_image: Image.Image | None = None,
        control_images: list[Image.Image] = (),
        conditioning: tuple[Tensor, Tensor, Tensor, Tensor] | None = None,
        seeds: Sequence[int] | None = None,
    ) -> tuple[Tensor, list[Image.Image]]:
        """Encode, denoise, decode -> (latents, images); records each stage's seconds in
        `timings`. The prompt is encoded before the first step, so per-step times are the
        denoiser's alone; with `compile`, `compile` is the first step's time beyond the others'
        and `per_step` leaves the first step out. With `s.inpaint`, a masked generation: the
        latents are the working canvas's, the images the finished (pasted-back) ones.
        `conditioning` (as `encode_prompt` returns it, one row per image or one for all) and
        `seeds` (one per image: its starting noise and its samplers' noise) replace the prompt's
        and seed + i: several requests denoised as one batch, each image as it would be alone
        (`sd3.serve`)."""
        check_settings(s, self.config, init_image is not None, mask_image is not None)
        if seeds is not None:
            check_seeds(seeds, s.num_images)
        self.check_loras(s.use_t5)
        job = None
        if s.inpaint is not None:
            job = inpainting.prepare(init_image, mask_image, (s.width, s.height), s.inpaint, s.seed)
            init_image = job.image
        started = time.perf_counter()
        controls = self.control_latents(s, list(control_images))
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

            latents = self._denoise(
                s, init_image, step, conditioning, job and job.mask, controls, seeds=seeds
            )
            # a GPU's steps are queued: wait for them, so the time is theirs, not the queueing's
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
        if self.low_memory:
            self.release("mmdit", "controlnet")
        sampled = time.perf_counter()
        images = self.decode(latents)
        if job is not None:
            images = [job.finish(image) for image in images]
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
