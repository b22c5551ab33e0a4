"""Channels-last layout for CPU inference of convolutional networks (the VAE).

oneDNN's CPU convolutions run much faster on channels-last tensors (benchmarks/RESULTS.md).
Training (gradients on) and other devices keep the default layout, so an optimizer's view of
the parameters never changes.
"""

import torch
from torch import Tensor, nn


def channels_last_for_inference(module: nn.Module, x: Tensor, probe: Tensor) -> Tensor:
    """`x` in channels-last layout where CPU inference gains from it, `module`'s weights converted
    once (`probe`, one of its 4-d weights, tells whether they already are); else `x` as it is."""
    if x.device.type != "cpu" or torch.is_grad_enabled():
        return x
    channels_last = torch.channels_last
    if not probe.is_contiguous(memory_format=channels_last):
        module.to(memory_format=channels_last)
    return x.contiguous(memory_format=channels_last)
