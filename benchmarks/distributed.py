"""Per-rank memory of sharded (FSDP2, `sd3 train --shard`) vs unsharded (DDP) training of a
reduced-size MMDiT at 1, 2 and 4 ranks on the CPU (gloo).

    python benchmarks/distributed.py [--ranks 1,2,4] [--depth 8] [--hidden 512]

Each configuration runs under torchrun: the trainer's own pieces (`shard_mmdit` with activation
checkpointing, or DistributedDataParallel), AdamW, 2 steps of a global batch of 4 at 32x32.
Per rank it reports the bytes of the weights, gradients and AdamW state that rank holds (local
shards), and the growth of its peak RSS over the RSS before the model was built.
"""

import argparse
import json
import os
import resource
import subprocess
import sys

import torch


def worker(depth: int, hidden: int, shard: bool) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from sd3.models.mmdit import MMDiT, MMDiTConfig
    from sd3.training.flow import flow_loss
    from sd3.training.sharded import local, shard_mmdit
    from sd3.training.trainer import enable_gradient_checkpointing

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    torch.manual_seed(0)
    config = MMDiTConfig(
        depth=depth, hidden_size=hidden, mlp_hidden=4 * hidden, pos_embed_max_size=16,
        context_dim=256, pooled_dim=192, qk_norm=True,
    )  # fmt: skip
    mmdit = MMDiT(config)
    mmdit.pos_embed.requires_grad_(False)
    enable_gradient_checkpointing(mmdit)
    model = mmdit
    if shard:
        shard_mmdit(mmdit, bf16=False)
    elif world > 1:
        model = DistributedDataParallel(mmdit)
    params = [p for p in mmdit.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    per_rank = 4 // world
    g = torch.Generator().manual_seed(rank)
    for _ in range(2):
        x0 = torch.randn(per_rank, 16, 4, 4, generator=g)
        context = torch.randn(per_rank, 32, 256, generator=g)
        pooled = torch.randn(per_rank, 192, generator=g)
        loss = flow_loss(model, x0, torch.randn_like(x0), torch.rand(per_rank), context, pooled)
        loss.backward()
        optimizer.step()
        held = sum(local(p).numel() * 4 * 2 for p in params)  # weights and gradients
        optimizer.zero_grad(set_to_none=True)
    held += sum(
        local(t).numel() * t.element_size()
        for state in optimizer.state.values()
        for t in state.values()
        if torch.is_tensor(t) and t.dim() > 0
    )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    numbers = [None] * world
    dist.all_gather_object(numbers, (held, peak - start))
    if rank == 0:
        total = sum(p.numel() for p in MMDiT(config).parameters())
        print(json.dumps({"params": total, "ranks": world, "shard": shard, "per_rank": numbers}))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", default="1,2,4")
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--worker", choices=["shard", "ddp"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.depth, args.hidden, args.worker == "shard")
        return
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (os.path.join(os.path.dirname(__file__), "..", "src"), env.get("PYTHONPATH"))
        if p
    )  # fmt: skip
    print(
        f"{'mode':<6}{'ranks':>6}{'state/rank MB':>16}{'x 1 rank':>10}{'peak RSS growth/rank MB':>26}"
    )
    base = {}
    for mode in ("ddp", "shard"):
        for n in (int(r) for r in args.ranks.split(",")):
            cmd = [
                sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc_per_node={n}", __file__, "--worker", mode, "--depth", str(args.depth),
                "--hidden", str(args.hidden),
            ]  # fmt: skip
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
            result = json.loads(out.strip().splitlines()[-1])
            held = max(h for h, _ in result["per_rank"]) / 2**20
            rss = max(r for _, r in result["per_rank"]) / 2**20
            base.setdefault(mode, held)
            print(f"{mode:<6}{n:>6}{held:>16.1f}{held / base[mode]:>10.3f}{rss:>26.1f}")
    print(
        f"MMDiT of {result['params'] / 1e6:.1f} M parameters (depth {args.depth}, width {args.hidden})"
    )


if __name__ == "__main__":
    main()
