"""A real `sd3 serve` process on 127.0.0.1 for the tests and benchmarks/serve.py: started on a
free port (the server binds port 0 and says which it got), stopped with SIGTERM."""

import base64
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image

LISTENING = "sd3 serve: listening on "


class ServerProcess:
    def __init__(self, folder: Path, *args: str, env: dict | None = None, start_timeout=180.0):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.outputs = self.folder / "outputs"
        self.stdout_path = self.folder / "server.out"
        self.stderr_path = self.folder / "server.err"
        command = [
            sys.executable, "-m", "sd3", "serve", "--host", "127.0.0.1", "--port", "0",
            "--outputs", str(self.outputs), *args,
        ]  # fmt: skip
        with open(self.stdout_path, "w") as out, open(self.stderr_path, "w") as err:
            self.process = subprocess.Popen(
                command, stdout=out, stderr=err, cwd=self.folder, env={**os.environ, **(env or {})}
            )
        self.url = self._wait_listening(start_timeout)

    def _wait_listening(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.stdout_path.read_text().splitlines():
                if line.startswith(LISTENING):
                    return line[len(LISTENING) :].rstrip("/")
            if self.process.poll() is not None:
                raise RuntimeError(f"sd3 serve exited ({self.process.returncode}): {self.log()}")
            time.sleep(0.1)
        self.process.kill()
        raise RuntimeError(f"sd3 serve did not start in {timeout} s: {self.log()}")

    def log(self) -> str:
        return self.stderr_path.read_text()[-4000:]

    def client(self, **kwargs):
        import httpx

        return httpx.Client(base_url=self.url, timeout=kwargs.pop("timeout", 120.0), **kwargs)

    @property
    def pid(self) -> int:
        return self.process.pid

    def rss(self) -> int:
        """The server's resident memory in bytes."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM, then wait: the exit status (the process is killed if it hangs)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                raise
        return self.process.returncode


def png_b64(image: Image.Image, **save) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=save.pop("format", "PNG"), **save)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def decode_png(data: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(data)))
    image.load()
    return image


def wait_job(client, job_id: str, timeout: float = 120.0, until=("done", "failed", "cancelled")):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["state"] in until:
            return job
        time.sleep(0.05)
    raise TimeoutError(f"job {job_id} still {job['state']}")
