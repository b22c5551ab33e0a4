#!/usr/bin/env bash
# Uniform vs logit-normal(0, 1) timestep sampling at the same training budget (issue: SD3 paper,
# section 5.1): two MMDiTs trained by the default-model recipe from the same VAE, latents, text
# encoders, seed and step count, each scored by `sd3 eval` on the held-out shape prompts.
#   bash scripts/compare_timestep_sampling.sh [STEPS]   (after scripts/train_default_model.py)
set -euo pipefail
steps=${1:-600}
for sampling in uniform logit_normal; do
  out=runs/compare_${sampling}_${steps}
  mkdir -p "$out"
  cp -n runs/default/vae.safetensors runs/default/latents.safetensors "$out"/
  python scripts/train_default_model.py --out "$out" --export "$out/model.safetensors" \
    --steps "$steps" --timestep-sampling "$sampling"
  sd3 eval --model "$out/model.safetensors" | tee "$out/eval.txt"
done
