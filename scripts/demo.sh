#!/usr/bin/env bash
# The end-to-end demo behind `make demo`: synthetic data -> validate -> prepare ->
# train (about two minutes on 2 CPU cores) -> evaluate -> predict.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${DEMO_DIR:-demo_output}
deeplab=.venv/bin/deeplab
rm -rf "$out"

echo "== 1/6 generate a synthetic dataset"
$deeplab synth "$out/data" --num 120 --seed 0
echo "== 2/6 validate it"
$deeplab validate "$out/data"
echo "== 3/6 prepare it (train/val split, class statistics)"
$deeplab prepare "$out/data" --val-fraction 0.2 --seed 0
echo "== 4/6 train DeepLab v3+ (${DEMO_TIME:-2m} on the CPU)"
# At least 120 steps, however slow the CPU: fewer leave the thinnest class unlearnt
# (BENCHMARKS.md §0); a 2-core AMD EPYC makes 110-200 in the 2 minutes.
$deeplab train --config configs/deeplabv3plus_resnet18_synthetic_128.yaml \
    --data "$out/data" --output "$out/run" --time "${DEMO_TIME:-2m}" --min-steps "${DEMO_MIN_STEPS:-120}"
echo "== 5/6 evaluate the best checkpoint on the validation split"
$deeplab eval --checkpoint "$out/run" --data "$out/data" --output "$out/eval"
echo "== 6/6 predict a few images"
$deeplab predict --checkpoint "$out/run" "$out"/data/images/000[0-5].jpg --output "$out/predictions"

cat <<DONE

Demo finished. Outputs:
  dataset          $out/data          (images/, masks/, dataset.yaml, splits/)
  training run     $out/run           (best.pt, last.pt, config.yaml, metrics.jsonl, tb/)
  evaluation       $out/eval          (metrics.json, confusion_matrix.csv/.png)
  predictions      $out/predictions   (index masks *.png, overlays *_overlay.jpg)
TensorBoard:       .venv/bin/tensorboard --logdir $out/run/tb
DONE
