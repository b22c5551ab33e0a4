#!/usr/bin/env python3
"""sd3 from a fresh clone, with nothing but Python 3.11+:

    python3 quickstart.py demo   # install into .venv, then draw a picture with the bundled model
    python3 quickstart.py test   # install into .venv with the test extras, then run every test
                                 # (as root with apt: also chromium for the page's browser test)

Both are idempotent: the virtual environment is made once, and the install runs again only when
pyproject.toml has changed since the last one. Arguments after the verb go to `sd3 generate`
(demo) or to pytest (test). torch is pinned to its CPU wheel.
"""

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if sys.platform == "win32" else "bin")
TORCH = "torch==2.13.0"  # the CPU wheel; any other spec pulls a multi-GB CUDA build
MIN_FREE_GIB = 4
PROMPT = "a red circle above a blue square"


def install(extras: str) -> None:
    """Make .venv and install sd3 (editable, with `extras`) unless it already matches."""
    if sys.version_info < (3, 11):  # noqa: UP036 (this file runs before anything is installed)
        sys.exit(f"sd3 needs Python 3.11 or newer; this is {sys.version.split()[0]}")
    if not (BIN / "python").exists() and not (BIN / "python.exe").exists():
        print(f"quickstart: creating {VENV.name}/", flush=True)
        venv.create(VENV, with_pip=True)
    wanted = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + extras.encode()).hexdigest()
    stamp = VENV / ".sd3-installed"
    if stamp.exists() and wanted in stamp.read_text().split():
        return
    pip = [str(BIN / "python"), "-m", "pip", "install", "--disable-pip-version-check"]
    subprocess.run([*pip, TORCH], check=True)
    subprocess.run([*pip, "-e", f"{ROOT}{extras}"], check=True)
    with stamp.open("a") as f:  # several extras may be installed: keep each one's stamp
        f.write(wanted + "\n")


def browser() -> None:
    """Headless Chromium and its driver for the page's test (tests/test_serve_page.py): Debian's
    packages, installed where they are missing and apt can (as root: CI); elsewhere that test
    skips and says why."""
    if shutil.which("chromium") and shutil.which("chromedriver"):
        return
    if not (hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get")):
        print("quickstart: no chromium/chromedriver (the browser test will skip)", flush=True)
        return
    print("quickstart: installing chromium and chromium-driver with apt-get", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    quiet = {"env": env, "stdout": subprocess.DEVNULL}
    if (
        subprocess.run(["apt-get", "update", "-qq"], **quiet).returncode
        or subprocess.run(
            ["apt-get", "install", "-y", "-qq", "chromium", "chromium-driver"], **quiet
        ).returncode
    ):
        print("quickstart: apt-get could not install chromium", flush=True)


def main(argv: list[str]) -> int:
    verbs = {"demo", "test"}
    if not argv or argv[0] not in verbs:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    verb, rest = argv[0], argv[1:]
    if verb == "demo":
        install("")
        out = ROOT / "out"
        out.mkdir(exist_ok=True)
        command = [str(BIN / "sd3"), "generate", PROMPT, *rest]
        return subprocess.run(command, cwd=out).returncode
    install("[test]")
    browser()
    free = shutil.disk_usage(tempfile.gettempdir()).free / 2**30
    print(f"quickstart: {free:.1f} GiB free in {tempfile.gettempdir()}", flush=True)
    if free < MIN_FREE_GIB:  # the suite writes checkpoint-sized files: fail once, not in 20 tests
        print(f"quickstart: the tests need about {MIN_FREE_GIB} GiB free there", file=sys.stderr)
        return 1
    return subprocess.run([str(BIN / "python"), "-m", "pytest", "-q", *rest], cwd=ROOT).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
