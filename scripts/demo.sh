#!/usr/bin/env bash
# `make demo`: the whole two-stage pipeline on the embedded Shapes data, on the CPU.
#   1. stage one: a KL-f2 autoencoder (32x32 images -> 3x16x16 latents)
#   2. stage two: a text-conditional latent diffusion model on its frozen latents
#      (the packaged all-MiniLM-L6-v2 encoder feeds cross-attention)
#   3. samples for a few prompts with classifier-free guidance -> outputs/demo/samples/grid.png
# Step counts can be changed: AE_STEPS=... LDM_STEPS=... make demo
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${DEMO_OUT:-outputs/demo}
AE_STEPS=${AE_STEPS:-800}
LDM_STEPS=${LDM_STEPS:-1000}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}

rm -rf "$OUT"
mkdir -p "$OUT"
echo "== stage one: KL-f2 autoencoder on Shapes ($AE_STEPS steps)"
$PY main.py -b configs/autoencoder/kl_f2_shapes_tiny.yaml -t -l "$OUT/logs" -n stage1 \
    lightning.trainer.max_steps="$AE_STEPS"
AE=$(ls -d "$OUT"/logs/*_stage1 | tail -n 1)

echo "== stage two: text-conditional LDM on the stage-one latents ($LDM_STEPS steps)"
$PY main.py -b configs/diffusion/ldm_shapes_text_tiny.yaml -t -l "$OUT/logs" -n stage2 \
    model.params.first_stage_config.params.ckpt_path="$AE/checkpoints/last.ckpt" \
    lightning.trainer.max_steps="$LDM_STEPS"
LDM=$(ls -d "$OUT"/logs/*_stage2 | tail -n 1)

echo "== sampling"
$PY scripts/sample.py --run "$LDM" --n 8 --sampler ddim --steps 50 --scale 3 --seed 0 \
    --prompt "a large red circle" --prompt "a large blue square" \
    --prompt "a large green triangle" --prompt "a large yellow star" \
    --outdir "$OUT/samples"
echo "== done: $OUT/samples/grid.png (one row per prompt), runs in $OUT/logs"
