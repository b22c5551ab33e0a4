"""`sd3 serve` under load: N concurrent clients on loopback against a real server process with
the bundled model, once with the queue's batching off (`--batch-limit 1`) and once on. Appends
its table to benchmarks/RESULTS.md (or prints it with --no-write).

    python benchmarks/serve.py [--clients 8] [--requests 200] [--steps 8] [--size 128]

Each client sends A1111 `txt2img` requests (one image each, its own seed) one after another
until the run has sent `--requests` or `--max-seconds` have passed. Reported per run: images/s
over the run's wall time, p50/p95 request latency, the server's RSS after a warm-up and after
the run (it must not grow by more than `--rss-margin` MiB), and the bookkeeping: every request
answered 200 with exactly one image, every job id and seed once, and the SQLite history holding
each job once (`GET /v1/history`). Any lost or duplicated job fails the run (exit status 1).
"""

import argparse
import itertools
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from serve_helpers import ServerProcess  # noqa: E402

PROMPTS = ("a red circle above a blue square", "a green triangle", "a yellow star on the left")
WARM_UP = 4  # requests before the first RSS reading (allocator pools, first-call caches)


def machine() -> str:
    model = "unknown CPU"
    for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
        if line.startswith("Model name:"):
            model = line.split(":", 1)[1].strip()
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    avx512 = "AVX-512" if " avx512f" in flags else "no AVX-512"
    amx = "AMX" if " amx_tile" in flags else "no AMX"
    cores = len(__import__("os").sched_getaffinity(0))
    return (
        f"{model} ({avx512}, {amx}), {cores} cores available, torch {torch.__version__}, "
        f"Python {platform.python_version()}"
    )


def body(index: int, args) -> dict:
    return {
        "prompt": PROMPTS[index % len(PROMPTS)], "seed": 1000 + index, "steps": args.steps,
        "width": args.size, "height": args.size, "sampler_name": "Euler", "batch_size": 1,
    }  # fmt: skip


def run_load(server: ServerProcess, args, first: int) -> dict:
    """The clients' run: requests `first` .. `first + args.requests - 1`."""
    counter = itertools.count(first)
    last = first + args.requests
    deadline = time.monotonic() + args.max_seconds
    lock = threading.Lock()
    results, failures = [], []

    def client() -> None:
        with server.client(timeout=args.max_seconds + 60) as c:
            while time.monotonic() < deadline:
                with lock:
                    index = next(counter)
                if index >= last:
                    return
                started = time.perf_counter()
                r = c.post("/sdapi/v1/txt2img", json=body(index, args))
                seconds = time.perf_counter() - started
                if r.status_code != 200:
                    failures.append((index, r.status_code, r.text[:200]))
                    continue
                info = json.loads(r.json()["info"])
                with lock:
                    results.append(
                        {
                            "index": index,
                            "seconds": seconds,
                            "job": info["sd3"]["job_id"],
                            "seeds": info["all_seeds"],
                            "images": len(r.json()["images"]),
                            "batch_jobs": None,
                        }  # fmt: skip
                    )

    threads = [threading.Thread(target=client) for _ in range(args.clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    return {"results": results, "failures": failures, "wall": wall}


def one_run(batch_limit: int, args, folder: Path) -> dict:
    server = ServerProcess(
        folder, "--steps", str(args.steps), "--max-queue", str(args.requests + args.clients),
        "--batch-limit", str(batch_limit), "--max-batch", "8", "--no-previews",
    )  # fmt: skip
    try:
        warm = run_load(server, argparse.Namespace(**{**vars(args), "requests": WARM_UP}), 0)
        rss_before = server.rss()
        load = run_load(server, args, WARM_UP)
        rss_after = server.rss()
        with server.client() as c:
            history = c.get("/v1/history", params={"limit": 200}).json()
            total = history["total"]
            jobs = {r["job"] for r in load["results"]}
            batch_sizes = [
                c.get(f"/v1/jobs/{job}").json()["timings"].get("batch_jobs", 1)
                for job in list(jobs)[:50]
            ]
    finally:
        status = server.stop()
    results = load["results"]
    seconds = sorted(r["seconds"] for r in results)
    seeds = [s for r in results for s in r["seeds"]]
    sent = min(args.requests, len(results) + len(load["failures"]))
    expected_seeds = {1000 + WARM_UP + i for i in range(sent)}
    lost = sent - len(results)
    duplicated = (len(results) - len({r["job"] for r in results})) + (len(seeds) - len(set(seeds)))
    bad = set(seeds) != expected_seeds or any(r["images"] != 1 for r in results)
    history_expected = len(warm["results"]) + len(results)
    return {
        "batch_limit": batch_limit,
        "requests": len(results),
        "failures": load["failures"][:3],
        "wall": load["wall"],
        "images_per_s": len(results) / load["wall"],
        "p50": statistics.median(seconds) if seconds else float("nan"),
        "p95": seconds[min(len(seconds) - 1, int(0.95 * len(seconds)))]
        if seconds
        else float("nan"),
        "rss_before": rss_before,
        "rss_after": rss_after,
        "lost": lost + (history_expected - total if total < history_expected else 0),
        "duplicated": duplicated + (total - history_expected if total > history_expected else 0),
        "bad": bad,
        "mean_batch": statistics.mean(batch_sizes) if batch_sizes else 1.0,
        "exit": status,
    }


def table(runs: list[dict], args) -> str:
    mib = 1 << 20
    lines = [
        f"## `sd3 serve` under load ({time.strftime('%Y-%m-%d')})",
        "",
        f"`benchmarks/serve.py`: {args.clients} clients on loopback, A1111 `txt2img`, the bundled "
        f"model at {args.size}², {args.steps} steps, euler, one image per request, "
        f"{args.requests} requests per run. Machine: {machine()}.",
        "",
        "| queue | requests | images/s | p50 latency s | p95 latency s | mean jobs per batch "
        "| RSS before → after (MiB) | lost | duplicated |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        name = "no batching" if r["batch_limit"] == 1 else f"batching (≤ {r['batch_limit']})"
        lines.append(
            f"| {name} | {r['requests']} | {r['images_per_s']:.2f} | {r['p50']:.2f} | "
            f"{r['p95']:.2f} | {r['mean_batch']:.1f} | {r['rss_before'] / mib:.0f} → "
            f"{r['rss_after'] / mib:.0f} | {r['lost']} | {r['duplicated']} |"
        )
    if len(runs) == 2 and runs[0]["images_per_s"] > 0:
        gain = runs[1]["images_per_s"] / runs[0]["images_per_s"]
        lines += ["", f"Batching: {gain:.2f}× the images/s of one job at a time."]
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=200, help="requests per run (at most 1000)")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--batch-limit", type=int, default=8, help="images per batch when batching")
    p.add_argument("--max-seconds", type=float, default=900, help="a run stops sending after this")
    p.add_argument("--rss-margin", type=float, default=64, help="MiB the RSS may grow by")
    p.add_argument("--no-write", action="store_true", help="print, do not append to RESULTS.md")
    args = p.parse_args()
    if not (1 <= args.clients <= 64 and 1 <= args.requests <= 1000):
        p.error("--clients must be in 1..64 and --requests in 1..1000")
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for limit in (1, args.batch_limit):
            runs.append(one_run(limit, args, Path(tmp) / f"limit{limit}"))
            print(json.dumps(runs[-1], default=str), file=sys.stderr, flush=True)
    text = table(runs, args)
    grew = [r for r in runs if r["rss_after"] - r["rss_before"] > args.rss_margin * (1 << 20)]
    failed = [r for r in runs if r["lost"] or r["duplicated"] or r["bad"] or r["exit"] != 0]
    text += (
        f"\nRSS growth within {args.rss_margin:g} MiB: {'no' if grew else 'yes'}; "
        f"every request answered once with its own seed and recorded once in the history: "
        f"{'no' if failed else 'yes'}.\n"
    )
    print(text)
    if not args.no_write:
        with open(ROOT / "benchmarks" / "RESULTS.md", "a") as f:
            f.write("\n" + text)
    return 1 if failed or grew else 0


if __name__ == "__main__":
    sys.exit(main())
