"""Jobs, the queue and the one worker thread that owns the model.

Requests become `Job`s in a bounded FIFO queue (`JobQueue.submit` refuses past `max_queued`).
The worker takes the oldest job and, with it, every later queued job that can share its
denoising batch (`Job.batch_key`: same size, steps, sampler, guidance, shift and T5 length, no
init image) until the batch holds `batch_limit` images: each image keeps its own prompt and seed
(its starting noise and, for ancestral and SDE samplers, their noise), so it is the image its
request would get alone (to the rounding of a larger matrix product). A job that fails in a
shared batch is run again alone, so one bad job cannot fail the others.

Cancelling a queued job removes it at once; a running job stops at its next step (its rows of a
shared batch are dropped; the batch stops when none is left). On shutdown the queued jobs are
cancelled and the running batch may finish until a deadline, after which it stops at its next
step. Every job that ends is recorded in the history with its images (`history.py`).
"""

import asyncio
import itertools
import math
import secrets
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from PIL import Image

from .. import metadata
from ..checkpoints import Component
from ..cli import encoded_image, one_line
from ..outputs import write_new
from ..pipeline import Pipeline, Settings
from .history import History
from .preview import PreviewMap

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
ENDED = (DONE, FAILED, CANCELLED)
RECENT_JOBS = 256  # ended jobs kept in memory; older ones are read from the history


class QueueFull(Exception):
    pass


class ShuttingDown(Exception):
    pass


class Cancelled(Exception):
    """Raised from the step callback: no job of the batch is still wanted."""


def new_job_id() -> str:
    return secrets.token_hex(8)


@dataclass(eq=False)
class Job:
    settings: Settings  # seed fixed: what the images are made from
    init_image: Image.Image | None = None
    mask_image: Image.Image | None = None  # inpainting: white repaints
    loras: tuple[tuple[str, float], ...] = ()  # (name, strength) of the server's LoRAs it uses
    controlnets: tuple[str, ...] = ()  # the server's ControlNets it runs, as settings.controls
    control_images: list[Image.Image] = field(default_factory=list)  # one per ControlNet
    source: str = "native"  # or "a1111"
    batch_key: tuple | None = None  # jobs with equal keys can share a denoising batch
    id: str = field(default_factory=new_job_id)
    created: float = field(default_factory=time.time)
    state: str = QUEUED
    started: float | None = None
    finished: float | None = None
    step: int = 0
    steps: int = 0  # the steps it runs (fewer than settings.steps for img2img)
    eta: float | None = None  # seconds left, once a step has run
    error: str | None = None
    images: list[dict] = field(default_factory=list)  # {"name", "seed"}
    timings: dict = field(default_factory=dict)
    preview: bytes | None = None  # PNG of the current x0 prediction of its first image
    preview_step: int = 0
    cancel_requested: bool = False

    @property
    def ended(self) -> bool:
        return self.state in ENDED

    def view(self, position: int | None = None) -> dict:
        """The public view: what `GET /v1/jobs/{id}` answers and the history records."""
        return {
            "id": self.id,
            "state": self.state,
            "source": self.source,
            "created": self.created,
            "started": self.started,
            "finished": self.finished,
            "queue_position": position,
            "step": self.step,
            "steps": self.steps,
            "progress": 1.0
            if self.state == DONE
            else self.step / self.steps
            if self.steps
            else 0.0,
            "eta": self.eta,
            "error": self.error,
            "settings": self.settings.to_dict(),
            "loras": dict(self.loras),
            "controlnets": list(self.controlnets),
            "images": [{**image, "url": f"/v1/images/{image['name']}"} for image in self.images],
            "timings": self.timings,
        }


def batch_key(pipe: Pipeline, s: Settings, has_init_image: bool) -> tuple | None:
    """What must agree for two jobs to share a denoising batch; None where a job runs alone."""
    if has_init_image:
        return None
    slg = None if s.slg is None else (s.slg.scale, tuple(s.slg.layers), s.slg.start, s.slg.end)
    return (
        s.width, s.height, s.steps, s.sampler, s.cfg, s.cfg_start, s.cfg_end, s.shift,
        s.denoise, slg, s.use_t5, pipe.text_length(s),
    )  # fmt: skip


class Hub:
    """Wakes the event loop's waiters (progress streams, waiting A1111 requests) when any job
    changes; the worker thread calls `notify`."""

    def __init__(self):
        self.loop: asyncio.AbstractEventLoop | None = None
        self._event: asyncio.Event | None = None

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop, self._event = loop, asyncio.Event()

    def notify(self) -> None:
        loop = self.loop
        if loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(self._fire)
            except RuntimeError:  # the loop closed meanwhile
                pass

    def _fire(self) -> None:
        event, self._event = self._event, asyncio.Event()
        event.set()

    async def wait(self, timeout: float) -> bool:
        """Until the next change (True) or `timeout` seconds (False). Check the state before
        calling: the loop runs one coroutine at a time, so no change slips in between."""
        try:
            await asyncio.wait_for(self._event.wait(), timeout)
            return True
        except TimeoutError:
            return False

    async def until_ended(self, job: "Job") -> None:
        while not job.ended:
            await self.wait(30.0)


class JobQueue:
    def __init__(self, max_queued: int, batch_limit: int, history: History, hub: Hub):
        self.max_queued, self.batch_limit = max_queued, batch_limit
        self.history, self.hub = history, hub
        self._cond = threading.Condition()
        self._queued: list[Job] = []
        self._jobs: OrderedDict[str, Job] = OrderedDict()  # queued, running and recent jobs
        self.running: list[Job] = []
        self.closed = False
        self.stop_at: float | None = None  # after shutdown: the running batch stops here
        self.seconds_per_job: float | None = None  # a running average, for Retry-After

    # --- requests' side ---------------------------------------------------------------------

    def submit(self, job: Job) -> None:
        with self._cond:
            if self.closed:
                raise ShuttingDown
            if len(self._queued) >= self.max_queued:
                raise QueueFull
            self._queued.append(job)
            self._jobs[job.id] = job
            self._prune()
            self._cond.notify()
        self.hub.notify()

    def get(self, job_id: str) -> Job | None:
        with self._cond:
            return self._jobs.get(job_id)

    def position(self, job: Job) -> int | None:
        """1 for the next job to run, 0 while running, None once ended."""
        with self._cond:
            if job.state == RUNNING:
                return 0
            try:
                return self._queued.index(job) + 1
            except ValueError:
                return None

    def snapshot(self) -> tuple[list[Job], list[Job]]:
        """(running jobs, queued jobs in order)."""
        with self._cond:
            return list(self.running), list(self._queued)

    def counts(self) -> tuple[int, int]:
        """(queued jobs, running jobs)."""
        with self._cond:
            return len(self._queued), len(self.running)

    def retry_after(self) -> int:
        """Seconds until a place in the queue is likely to be free."""
        per_job = self.seconds_per_job or 5.0
        return max(1, min(600, math.ceil(per_job * max(1, len(self._queued) // 2))))

    def cancel(self, job: Job) -> None:
        """A queued job ends now; a running one at its next step."""
        with self._cond:
            queued = job in self._queued
            if queued:
                self._queued.remove(job)
            elif job.state == RUNNING:
                job.cancel_requested = True
        if queued:
            self.end(job, CANCELLED, "cancelled before it started")

    def close(self, grace: float) -> None:
        """Take no more jobs; cancel the queued ones; the running batch may go on `grace` s."""
        with self._cond:
            if self.closed:
                return
            self.closed = True
            self.stop_at = time.monotonic() + grace
            queued, self._queued = self._queued, []
            self._cond.notify_all()
        for job in queued:
            self.end(job, CANCELLED, "the server shut down before it started")

    # --- the worker's side ------------------------------------------------------------------

    def next_batch(self) -> list[Job] | None:
        """The oldest job and the queued jobs that can share its batch; None once closed."""
        with self._cond:
            while not self._queued and not self.closed:
                self._cond.wait()
            if not self._queued:
                return None
            head = self._queued.pop(0)
            batch, images = [head], head.settings.num_images
            if head.batch_key is not None:
                for job in list(self._queued):
                    n = job.settings.num_images
                    if job.batch_key == head.batch_key and images + n <= self.batch_limit:
                        batch.append(job)
                        self._queued.remove(job)
                        images += n
            now = time.time()
            for job in batch:
                job.state, job.started = RUNNING, now
            self.running = batch
        self.hub.notify()
        return batch

    def batch_done(self, jobs: int, seconds: float) -> None:
        with self._cond:
            self.running = []
            per_job = seconds / max(jobs, 1)
            old = self.seconds_per_job
            self.seconds_per_job = per_job if old is None else 0.8 * old + 0.2 * per_job

    def end(self, job: Job, state: str, error: str | None = None, images: list[dict] = ()) -> None:
        """Record the job's end (with the image files it wrote) and tell the waiters."""
        job.finished = time.time()
        job.error = error
        job.images = [{"name": i["name"], "seed": i["seed"]} for i in images]
        job.timings = {**job.timings, "total": job.finished - job.created}
        if job.started is not None:
            job.timings["queued"] = job.started - job.created
        job.state = state
        job.init_image = job.mask_image = None
        job.control_images = []
        job.preview = None
        try:
            self.history.record(job.view(), list(images))
        except Exception as e:  # the job's files are written; its record is not
            print(f"sd3 serve: cannot record job {job.id}: {one_line(e)}", file=sys.stderr)
        self.hub.notify()

    def _prune(self) -> None:
        """Forget the oldest ended jobs beyond RECENT_JOBS (the history still has them)."""
        ended = [job_id for job_id, job in self._jobs.items() if job.ended]
        for job_id in itertools.islice(ended, max(0, len(ended) - RECENT_JOBS)):
            del self._jobs[job_id]


class Worker(threading.Thread):
    """Runs the queue's batches on the model, one at a time, until the queue closes."""

    def __init__(
        self,
        queue: JobQueue,
        pipe: Pipeline,
        outputs: Path,
        records: dict,
        model_name: str,
        previews: PreviewMap | None,
        lora_records: dict[str, dict] | None = None,
        controlnets: dict[str, tuple[Path, Component]] | None = None,
    ):
        super().__init__(name="sd3-worker", daemon=True)
        self.queue, self.pipe, self.outputs = queue, pipe, outputs
        self.records, self.model_name, self.previews = records, model_name, previews
        self.lora_records = lora_records or {}  # the server's LoRAs by name, at strength 1
        self.lora_scales: dict[str, float] = dict.fromkeys(self.lora_records, 0.0)
        self.controlnets = {name: c for name, (_, c) in (controlnets or {}).items()}
        self.controlnet_records = {
            name: metadata.file_record(path) for name, (path, _) in (controlnets or {}).items()
        }
        self.running_controlnets: tuple[str, ...] = ()
        self.live_previews = previews is not None

    def run(self) -> None:
        while (batch := self.queue.next_batch()) is not None:
            started = time.perf_counter()
            try:
                self.run_batch(batch)
            except Exception as e:  # a bug, not a job's fault: its jobs fail, the worker goes on
                for job in batch:
                    if job.state == RUNNING:
                        self.queue.end(job, FAILED, f"unexpected {type(e).__name__}: {one_line(e)}")
            self.queue.batch_done(len(batch), time.perf_counter() - started)

    def run_batch(self, batch: list[Job]) -> None:
        try:
            latents, images, timings = self.generate(batch)
        except Cancelled:
            return  # every job of the batch has ended already
        except Exception as e:
            if len(batch) > 1:  # find the job at fault: each alone
                for job in batch:
                    if job.state == RUNNING:
                        job.step = 0
                        self.run_batch([job])
                return
            message = one_line(e)
            print(f"sd3 serve: job {batch[0].id} failed: {message}", file=sys.stderr)
            self.queue.end(batch[0], FAILED, message)
            return
        first = 0
        for job in batch:
            n = job.settings.num_images
            mine = images[first : first + n]
            first += n
            if job.state != RUNNING:
                continue
            if job.cancel_requested:
                self.queue.end(job, CANCELLED, "cancelled")
                continue
            job.timings = {**job.timings, **timings}
            try:
                written = self.write(job, mine)
            except Exception as e:
                self.queue.end(job, FAILED, one_line(e))
                continue
            job.step, job.eta = job.steps, 0.0
            self.queue.end(job, DONE, images=written)

    def use_loras(self, loras: tuple[tuple[str, float], ...]) -> None:
        """The server's LoRAs at the strengths a batch asks (the others at 0)."""
        scales = {**dict.fromkeys(self.lora_records, 0.0), **dict(loras)}
        if scales != self.lora_scales:
            self.pipe.set_lora_scales(scales)
            self.lora_scales = scales

    def use_controlnets(self, names: tuple[str, ...]) -> None:
        """The pipeline runs these ControlNets (a change loads them again, from the page cache
        while it holds their files)."""
        if names != self.running_controlnets:
            self.pipe.release("controlnet")
            self.pipe.controlnets = [self.controlnets[name] for name in names]
            self.running_controlnets = names

    def generate(self, batch: list[Job]):
        """Denoise and decode the batch -> (latents, images, timings)."""
        pipe = self.pipe
        started = time.perf_counter()
        self.use_loras(batch[0].loras)  # a batch's jobs agree on them (their batch key)
        self.use_controlnets(batch[0].controlnets)  # jobs with ControlNets run alone
        if len(batch) == 1:
            job = batch[0]
            latents, images = pipe.generate(
                job.settings,
                job.init_image,
                self.callback(batch, started),
                mask_image=job.mask_image,
                control_images=job.control_images,
            )
        else:
            conditionings = [pipe.encode_prompt(job.settings) for job in batch]
            conditioning = tuple(
                torch.cat(
                    [
                        c[k].expand(job.settings.num_images, *c[k].shape[1:])
                        for c, job in zip(conditionings, batch, strict=True)
                    ]
                )
                for k in range(4)
            )
            seeds = [job.settings.seed + i for job in batch for i in range(job.settings.num_images)]
            s = replace(batch[0].settings, num_images=len(seeds))
            latents, images = pipe.generate(
                s, callback=self.callback(batch, started), conditioning=conditioning, seeds=seeds
            )
        timings = {
            "generate": time.perf_counter() - started,
            "denoise": pipe.timings["denoise"],
            "decode": pipe.timings["decode"],
            "batch_images": len(images),
            "batch_jobs": len(batch),
        }
        return latents, images, timings

    def callback(self, batch: list[Job], started: float):
        rows, first = [], 0
        for job in batch:
            rows.append((job, first))
            first += job.settings.num_images

        def step(i: int, total: int, x, denoised) -> None:
            now = time.perf_counter()
            stop = self.queue.stop_at is not None and time.monotonic() >= self.queue.stop_at
            wanted = False
            for job, row in rows:
                if job.state != RUNNING:
                    continue
                if job.cancel_requested or stop:
                    reason = "the server shut down" if stop else "cancelled"
                    self.queue.end(job, CANCELLED, reason)
                    continue
                wanted = True
                job.step, job.steps = i + 1, total
                job.eta = (now - started) / (i + 1) * (total - i - 1)
                if self.live_previews and self.previews is not None:
                    job.preview = self.previews.png(denoised[row])
                    job.preview_step = i + 1
            self.queue.hub.notify()
            if not wanted:
                raise Cancelled

        return step

    def write(self, job: Job, images: list[Image.Image]) -> list[dict]:
        """Each image as a PNG with its metadata in the outputs folder -> history rows."""
        written = []
        records = self.job_records(job)
        for k, image in enumerate(images):
            one = replace(job.settings, seed=job.settings.seed + k, num_images=1)
            path = self.outputs / f"sd3-{job.id}-{k}.png"
            data = encoded_image(image, path, one, records)
            path = write_new(path, data, "--outputs")
            written.append(
                {"name": path.name, "seed": one.seed, "settings": one.to_dict(),
                 "model": self.model_name}
            )  # fmt: skip
        return written

    def job_records(self, job: Job) -> dict:
        """The files an image of `job` records: the server's, and the LoRAs it chose."""
        records = dict(self.records)
        if job.loras:
            chosen = [{**self.lora_records[name], "scale": scale} for name, scale in job.loras]
            records["loras"] = [*self.records.get("loras", []), *chosen]
        if job.controlnets:
            records["controlnet"] = [self.controlnet_records[name] for name in job.controlnets]
        return records
