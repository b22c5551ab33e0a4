"""Pre-training the bundled model's small text encoders on what the captions say.

SD3 conditions on frozen, pretrained text encoders. None exist at the bundled model's size, and
random ones keep almost no trace of word order: the pooled vectors of "a red circle above a blue
square" and "a blue square above a red circle" have cosine 0.9996, so nothing tells the MMDiT
which object is the subject of a relation (it swaps them as often as it gets them right).
Training the encoders with the MMDiT does not change that (their features move well under 1%).

This stage trains CLIP-L, CLIP-G and T5 on the training captions alone, no images, to make their
outputs state the caption's structure, the way a pretrained encoder carries what a sentence means:
- the pooled vector (the MMDiT's adaLN input) must give, through one linear map, every object
  group's colour, shape and count in caption order, and the relation;
- the context tokens (what the MMDiT attends to) must give the same through one attention
  readout, a learned query per group over the tokens, as the MMDiT's joint attention reads them;
- both must also give the layout a relation asks for: which object (colour and shape) is on the
  left, on the right, at the top and at the bottom ("a red circle below a blue square": blue
  square at the top, red circle at the bottom). From the tokens this is one fixed query per side,
  so the tokens themselves must say which side their object belongs on. That is the read an image
  token in the MMDiT makes (a query that depends on where it is), where the caption-order groups
  leave the step from "subject of below" to "bottom" to the MMDiT, which swaps them.
The readouts are thrown away afterwards. A distillation term keeps both outputs close to the
encoders' own starting outputs (relative squared error), so an MMDiT trained on them keeps
working and has to learn only the new directions. The empty prompt (what dropped encoders and
CFG's negative see) is part of every batch, with "no objects" as its structure.
"""

import copy
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from sd3.text import TextEncoders
from sd3.training.conditioning import embed, tokenize

from .scenes import (
    COLOURS,
    DEFAULT_MIX,
    MAX_OBJECTS,
    RELATIONS,
    SHAPES,
    SceneSpec,
    caption,
    parse_caption,
    sample_spec,
)

# Label vocabularies: index 0 of each is "no such group" / "no relation".
_COLOUR = {c: i + 1 for i, c in enumerate(COLOURS)}
_SHAPE = {s: i + 1 for i, s in enumerate(SHAPES)}
_RELATION = {r: i + 1 for i, r in enumerate(RELATIONS)}
FIELDS = {"colour": len(COLOURS) + 1, "shape": len(SHAPES) + 1, "count": MAX_OBJECTS + 1}
SIDES = ("left", "right", "top", "bottom")
SIDE_FIELDS = {"colour": len(COLOURS) + 1, "shape": len(SHAPES) + 1}
# which side the relation's subject (objects[0]) and its object (objects[1]) belong on
_SIDES_OF = {
    "left of": ("left", "right"),
    "right of": ("right", "left"),
    "above": ("top", "bottom"),
    "below": ("bottom", "top"),
}


def structure(spec: SceneSpec | None) -> Tensor:
    """A caption's labels: [MAX_OBJECTS, 3] (colour, shape, count per group in caption order, 0 for
    none) flattened, the relation (0 for none), then [4, 2] (colour, shape of the object on each
    of `SIDES`, 0 where the caption puts none) flattened. `None` is the empty prompt."""
    labels = torch.zeros(MAX_OBJECTS, 3, dtype=torch.long)
    sides = torch.zeros(len(SIDES), 2, dtype=torch.long)
    relation = 0
    if spec is not None:
        for k, o in enumerate(spec.objects):
            labels[k] = torch.tensor([_COLOUR[o.colour], _SHAPE[o.shape], o.count])
        if spec.relation:
            relation = _RELATION[spec.relation]
            for o, side in zip(spec.objects, _SIDES_OF[spec.relation], strict=True):
                sides[SIDES.index(side)] = torch.tensor([_COLOUR[o.colour], _SHAPE[o.shape]])
    return torch.cat([labels.flatten(), torch.tensor([relation]), sides.flatten()])


GROUP_LABELS = MAX_OBJECTS * len(FIELDS) + 1  # the caption-order part of `structure`


class StructureReadout(nn.Module):
    """The two readouts of a caption's structure: linear from the pooled vector, and one attention
    query per group, one for the relation and one per side over the context tokens."""

    def __init__(self, context_width: int, pooled_width: int, key_width: int = 64):
        super().__init__()
        groups, sides = MAX_OBJECTS, len(SIDES)
        side_widths = [*SIDE_FIELDS.values()]
        self.widths = [*FIELDS.values()] * groups + [len(RELATIONS) + 1] + side_widths * sides
        self.pooled = nn.Linear(pooled_width, sum(self.widths))
        self.queries = nn.Parameter(torch.randn(groups + 1 + sides, key_width) / key_width**0.5)
        self.keys = nn.Linear(context_width, key_width)
        self.norm = nn.LayerNorm(context_width)
        self.group = nn.Linear(context_width, sum(FIELDS.values()))
        self.relation = nn.Linear(context_width, len(RELATIONS) + 1)
        self.side = nn.Linear(context_width, sum(side_widths))

    def forward(self, context: Tensor, pooled: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """Logits per label (as `structure` orders them), from pooled and from the context."""
        from_pooled = list(self.pooled(pooled).split(self.widths, dim=-1))
        x = self.norm(context)
        weights = torch.softmax(self.keys(x) @ self.queries.T, dim=1)  # [B, tokens, queries]
        read = weights.transpose(1, 2) @ x  # [B, queries, width]
        n = MAX_OBJECTS
        groups = self.group(read[:, :n]).split([*FIELDS.values()], dim=-1)
        sides = self.side(read[:, n + 1 :]).split([*SIDE_FIELDS.values()], dim=-1)
        from_context = [g[:, k] for k in range(n) for g in groups] + [self.relation(read[:, n])]
        return from_pooled, from_context + [f[:, k] for k in range(len(SIDES)) for f in sides]


@dataclass
class PretrainReport:
    steps: int
    loss_first: float
    loss_last: float
    drift: float  # relative squared change of the outputs from the starting encoders (last steps)
    # per readout, the share of held-out captions whose groups and relation are all read right,
    # and ("_sides") of held-out relation captions whose four sides are all read right
    heldout_accuracy: dict[str, float]
    swap_cosine: dict[str, float]  # pooled / context cosine of "A <rel> B" vs "B <rel> A"


def pretrain_text_encoders(
    encoders: TextEncoders,
    steps: int,
    heldout: list[str],
    batch_size: int = 256,
    lr: float = 1e-3,
    keep_weight: float = 1.0,
    mix: dict[str, float] | None = None,
    pool: int = 20_000,
    seed: int = 0,
    progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
) -> PretrainReport:
    """Train `encoders` (CLIP-L, CLIP-G and T5) in place on `steps` batches of training captions
    as the module docstring says; `heldout` captions (never trained on) measure what the outputs
    say. Captions are drawn from a pool of `pool` training scenes' (with `mix`), tokenized once.
    Returns the losses, the drift from the starting outputs and the held-out readings.
    `on_step(step, loss)` is called after every step (a caller's own progress display)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not keep_weight >= 0:
        raise ValueError(f"keep_weight must be >= 0, got {keep_weight}")
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    t5_length = encoders.t5_length or 77
    pool = sorted({caption(sample_spec(rng, mix or DEFAULT_MIX)) for _ in range(pool)})
    pool_ids = tokenize(encoders, pool + [""], t5_length)
    labels = torch.stack([structure(parse_caption(c)) for c in pool] + [structure(None)])
    start = copy.deepcopy(encoders).requires_grad_(False)
    with torch.no_grad():
        start_context, start_pooled = embed(start, **pool_ids, t5_length=t5_length)
    scale = (start_context.var(), start_pooled.var())
    readout = StructureReadout(encoders.context_width, start_pooled.shape[-1])
    trained = [encoders.clip_l, encoders.clip_g] + ([encoders.t5] if encoders.t5 else [])
    params = [p for m in trained for p in m.parameters()]
    for m in trained:
        m.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(
        [{"params": params}, {"params": readout.parameters()}], lr=lr, weight_decay=0.0
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + np.cos(np.pi * s / steps))
    )
    losses, drifts = [], []
    empty = len(pool)
    for step in tqdm(range(steps), desc="text encoders", disable=not progress):
        rows = torch.from_numpy(rng.integers(len(pool), size=batch_size))
        rows[: max(1, batch_size // 16)] = empty  # the empty prompt in every batch
        ids = {k: v[rows] for k, v in pool_ids.items()}
        context, pooled = embed(encoders, **ids, t5_length=t5_length)
        from_pooled, from_context = readout(context, pooled)
        target = labels[rows]
        read = sum(
            F.cross_entropy(logits, target[:, i])
            for logits_list in (from_pooled, from_context)
            for i, logits in enumerate(logits_list)
        ) / (2 * target.shape[1])
        drift = (F.mse_loss(context, start_context[rows]) / scale[0]
                 + F.mse_loss(pooled, start_pooled[rows]) / scale[1]) / 2  # fmt: skip
        loss = read + keep_weight * drift
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        losses.append(read.item())
        drifts.append(drift.item())
        if on_step is not None:
            on_step(step + 1, losses[-1])
    for m in trained:
        m.eval().requires_grad_(False)
    tail = max(1, steps // 10)
    return PretrainReport(
        steps=steps,
        loss_first=losses[0],
        loss_last=float(np.mean(losses[-tail:])),
        drift=float(np.mean(drifts[-tail:])),
        heldout_accuracy=_accuracy(encoders, readout, heldout, t5_length),
        swap_cosine=swap_cosine(encoders, heldout),
    )


@torch.no_grad()
def _accuracy(
    encoders: TextEncoders, readout: StructureReadout, captions: list[str], t5_length: int
) -> dict[str, float]:
    context, pooled = embed(
        encoders, **tokenize(encoders, captions, t5_length), t5_length=t5_length
    )
    target = torch.stack([structure(parse_caption(c)) for c in captions])
    relation = target[:, GROUP_LABELS - 1] > 0
    result = {}
    for name, logits in zip(("pooled", "context"), readout(context, pooled), strict=True):
        right = torch.stack([lg.argmax(-1) for lg in logits], dim=1) == target
        result[name] = round(right[:, :GROUP_LABELS].all(dim=1).float().mean().item(), 3)
        if relation.any():
            sides = right[relation, GROUP_LABELS:].all(dim=1)
            result[f"{name}_sides"] = round(sides.float().mean().item(), 3)
    return result


@torch.no_grad()
def swap_cosine(encoders: TextEncoders, captions: list[str]) -> dict[str, float]:
    """Mean cosine between the outputs for "A <relation> B" and "B <relation> A" over the relation
    captions among `captions`: 1 means the encoders cannot tell subject from object."""
    pairs = []
    for c in captions:
        spec = parse_caption(c)
        if spec.relation is not None:
            pairs.append((c, caption(SceneSpec(spec.objects[::-1], spec.relation))))
    if not pairs:
        return {}
    a, pooled_a = encoders.encode([p for p, _ in pairs])
    b, pooled_b = encoders.encode([q for _, q in pairs])
    return {
        "pooled": round(F.cosine_similarity(pooled_a, pooled_b, dim=-1).mean().item(), 4),
        "context": round(F.cosine_similarity(a.flatten(1), b.flatten(1), dim=-1).mean().item(), 4),
    }
