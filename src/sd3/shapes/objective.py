"""The mirror-pairs experiment's objective: the rectified-flow loss plus a term on what tells the
two scenes of a pair apart.

With mirror pairs (`ShapesDataset(mirror_pairs=True)` trained with `TrainConfig.paired`), rows 2k
and 2k + 1 of a batch are a scene and its mirror, whose caption names the relation's objects the
other way round, with the same noise and sigma. Their velocity errors e1, e2 split as
|e1|^2 + |e2|^2 = |e1 + e2|^2 / 2 + |e1 - e2|^2 / 2: what the two have in common, and what tells
them apart, which is all a pair says about word order. `pair_contrast_loss` adds `weight` x the
mean of |e1 - e2|^2 / 2 on top of the plain loss (`sd3.training.flow.flow_loss`), weighting the part
the captions' difference explains more than the shared noise does.
"""

from collections.abc import Callable

from torch import Tensor

from sd3.training.flow import flow_loss, velocities


def pair_contrast_loss(
    mmdit: Callable[..., Tensor],
    x0: Tensor,
    noise: Tensor,
    sigma: Tensor,
    context: Tensor,
    pooled: Tensor,
    weight: float,
) -> Tensor:
    """`flow_loss` + `weight` x the mean of (e1 - e2)^2 / 2 over the pairs of rows (2k, 2k + 1)."""
    if not weight:
        return flow_loss(mmdit, x0, noise, sigma, context, pooled)
    predicted, target = velocities(mmdit, x0, noise, sigma, context, pooled)
    error = predicted - target
    return error.square().mean() + weight * (error[0::2] - error[1::2]).square().mean() / 2
