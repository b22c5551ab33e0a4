"""sd3: Stable Diffusion 3 and 3.5 in plain PyTorch."""

__version__ = "0.1.0"
