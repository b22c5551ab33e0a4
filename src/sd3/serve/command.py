"""`sd3 serve`: check everything, bind, load the model once, then serve until SIGTERM or Ctrl-C.

Safe by default: it binds to 127.0.0.1; any other address (`--listen` or `--host`) needs
`--api-key` (or SD3_API_KEY) unless `--insecure` says otherwise. Everything a request may ask
is bounded (`--max-...`). SIGTERM or Ctrl-C: no new jobs (503), the queued ones cancelled, the
running batch finishes within `--shutdown-grace` seconds or stops at its next step, the
history is closed, and the process exits with status 0.
"""

import argparse
import ipaddress
import os
import signal
import socket
from pathlib import Path

import uvicorn

from ..checkpoints import Component
from ..cli import (
    add_model_arguments,
    load_weights,
    model_files,
    open_pipeline,
    parse_device,
    resolve_settings,
)
from ..outputs import check_folder
from ..pipeline import Pipeline, check_settings
from .service import Limits, Service

KEY_VARIABLE = "SD3_API_KEY"
MAX_CONNECTIONS = 256  # open connections beyond this are answered 503


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)  # the model, and the defaults requests start from
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=7860, help="port (default: 7860; 0: any free)")
    p.add_argument(
        "--listen", action="store_true", help="bind all interfaces (0.0.0.0); needs --api-key"
    )
    p.add_argument(
        "--api-key",
        help=f"the key clients send as 'Authorization: Bearer KEY' (or set {KEY_VARIABLE})",
    )
    p.add_argument(
        "--insecure",
        action="store_true",
        help="allow binding beyond this machine without an API key",
    )
    p.add_argument(
        "--outputs", default="outputs",
        help="folder for the images and history.sqlite3 (default: ./outputs, made if missing)",
    )  # fmt: skip
    p.add_argument(
        "--lora-dir", metavar="DIR",
        help="LoRA files (*.safetensors) requests may choose by name (the file name without "
        "its extension) and strength; they run beside the weights, not merged",
    )  # fmt: skip
    p.add_argument(
        "--controlnet", action="append", default=[], metavar="FILE", dest="serve_controlnets",
        help="a ControlNet file or diffusers folder requests may choose by name (the file name "
        "without its extension); repeatable",
    )  # fmt: skip
    p.add_argument(
        "--cors", action="append", default=[], metavar="ORIGIN",
        help="allow browser pages from ORIGIN (repeatable; default: none)",
    )  # fmt: skip
    d = Limits()
    for name, default, what in (
        ("max-width", d.max_width, "largest width a request may ask"),
        ("max-height", d.max_height, "largest height a request may ask"),
        ("max-steps", d.max_steps, "most steps a request may ask"),
        ("max-batch", d.max_batch, "most images one request may ask"),
        ("max-queue", d.max_queue, "most jobs waiting; more are answered 429"),
        ("batch-limit", d.batch_limit, "most images in one denoising batch of several jobs (1: none)"),
        ("max-body", d.max_body, "largest request body in bytes"),
        ("max-image-pixels", d.max_image_pixels, "largest uploaded image in pixels"),
    ):  # fmt: skip
        p.add_argument(f"--{name}", type=int, default=default, help=f"{what} (default: {default})")
    p.add_argument(
        "--shutdown-grace", type=float, default=30.0,
        help="on SIGTERM, seconds the running job may take to finish before it stops (default: 30)",
    )  # fmt: skip
    p.add_argument("--no-previews", action="store_true", help="no step previews (no fit at start)")
    p.add_argument("--access-log", action="store_true", help="log every request")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_arguments(args: argparse.Namespace) -> tuple[str, str | None, Limits]:
    """(host, API key, limits), or one ValueError naming the option."""
    host = "0.0.0.0" if args.listen else args.host
    key = args.api_key or os.environ.get(KEY_VARIABLE) or None
    if not is_loopback(host) and key is None and not args.insecure:
        raise ValueError(
            f"binding {host} lets other machines in: give --api-key KEY (or set {KEY_VARIABLE}), "
            "or --insecure to serve without one"
        )
    if key is not None and len(key) < 8:
        raise ValueError("--api-key must be at least 8 characters")
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port {args.port} must be in 0..65535")
    limits = Limits(
        max_width=args.max_width, max_height=args.max_height, max_steps=args.max_steps,
        max_batch=args.max_batch, max_queue=args.max_queue, batch_limit=args.batch_limit,
        max_body=args.max_body, max_image_pixels=args.max_image_pixels,
    )  # fmt: skip
    for name, value in vars(limits).items():
        if value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.shutdown_grace < 0:
        raise ValueError(f"--shutdown-grace must be >= 0, got {args.shutdown_grace}")
    for origin in args.cors:
        if origin != "*" and not origin.startswith(("http://", "https://")):
            raise ValueError(f"--cors {origin!r} must be an origin such as http://host:port")
    return host, key, limits


def outputs_folder(text: str) -> Path:
    folder = Path(text)
    if not folder.exists() and folder.parent.is_dir():
        folder.mkdir()
    check_folder(folder, "--outputs")
    return folder.resolve()


def lora_folder(text: str | None) -> dict[str, Path]:
    """{name: file} of the LoRA files in `--lora-dir` (not its subfolders)."""
    if text is None:
        return {}
    folder = Path(text)
    if not folder.is_dir():
        raise ValueError(f"--lora-dir {text}: no such folder")
    files = sorted(p for p in folder.iterdir() if p.suffix == ".safetensors" and p.is_file())
    if not files:
        raise ValueError(f"--lora-dir {text}: no .safetensors files in it")
    return {p.stem: p.resolve() for p in files}


def controlnet_names(paths: list[str]) -> dict[str, Path]:
    """{name: file or folder} of the `--controlnet`s."""
    named = {}
    for text in paths:
        path = Path(text)
        if not path.exists():
            raise ValueError(f"--controlnet {text}: no such file or folder")
        name = path.stem if path.is_file() else path.name
        if name in named:
            raise ValueError(f"--controlnet: two ControlNets named {name!r}")
        named[name] = path.resolve()
    return named


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ValueError(
            f"cannot bind {host}:{port} ({os.strerror(e.errno) if e.errno else e})"
        ) from None
    return sock


def run(args: argparse.Namespace) -> int:
    from . import preview
    from .app import create_app

    # Everything that can be checked is checked before the weights load.
    host, key, limits = check_arguments(args)
    device = parse_device(args.device)
    files = model_files(args)
    outputs = outputs_folder(args.outputs)
    loras = lora_folder(args.lora_dir)
    pipe = open_pipeline(files, device, args.low_memory, args.compile)
    merged = {Path(lo["path"]).stem for lo in files.get("loras", [])}
    if merged & set(loras):
        raise ValueError(
            f"--lora and --lora-dir both have {sorted(merged & set(loras))}: give each once"
        )
    for path in loras.values():  # matched against the model now, read with the weights
        pipe.load_lora(path, 0.0)
    controlnets = load_controlnets(pipe, controlnet_names(args.serve_controlnets))
    defaults = resolve_settings(args, pipe, None)
    check_settings(defaults, pipe.config, has_init_image=False)
    sock = bind(host, args.port)

    load_weights(pipe, files)
    previews = None if args.no_previews else preview.fit(pipe.vae, pipe.device, pipe.dtype)
    service = Service(
        pipe, files, defaults, outputs, limits, previews, args.shutdown_grace, loras, controlnets
    )
    service.start()
    app = create_app(service, key, args.cors)
    config = uvicorn.Config(
        app,
        log_level="info",
        limit_concurrency=MAX_CONNECTIONS,
        timeout_graceful_shutdown=int(args.shutdown_grace) + 5,
        lifespan="on",
        access_log=args.access_log,
    )
    server = Server(config, service, sock)
    server.run(sockets=[sock])
    return 0


def load_controlnets(pipe: Pipeline, named: dict[str, Path]) -> dict[str, tuple[Path, Component]]:
    """{name: (file, ControlNet)} checked to fit the model, none of them running yet: a job's worker
    sets `pipe.controlnets` to those it chose. The served model's preset stays (an SD3.5
    ControlNet would bring its own defaults, which are for requests using it)."""
    preset, out = pipe.preset, {}
    for name, path in named.items():
        out[name] = (path, pipe.load_controlnet(path))
    pipe.preset, pipe.controlnets = preset, []
    return out


class Server(uvicorn.Server):
    """uvicorn's server that says where it listens once it does, and on SIGTERM/Ctrl-C stops the
    queue first (through the event loop: a signal may arrive while the loop holds the queue's
    lock) and exits with status 0 rather than raising the signal again."""

    def __init__(self, config: uvicorn.Config, service: Service, sock: socket.socket):
        super().__init__(config)
        self.service, self.sock = service, sock

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        host, port = self.sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        print(f"sd3 serve: listening on http://{shown}:{port}/", flush=True)

    def handle_exit(self, sig: int, frame) -> None:
        loop = self.service.hub.loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self.service.shutdown)
        else:
            self.service.shutdown()
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        else:
            self.should_exit = True
