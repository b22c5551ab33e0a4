"""Training SD3-style models: the rectified-flow objective, datasets, the trainer, LoRA and export."""
