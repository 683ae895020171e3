#!/usr/bin/env bash
# Every GPU figure of BENCHMARKS.md §6 in one run, sized for under 8 minutes on one H200:
#   bash bench/gpu.sh                 # on a machine with a CUDA GPU
#   TINY=1 bash bench/gpu.sh          # the same steps at toy size on the CPU (the tests run it)
# CAMVID=/path/to/camvid (11-class 480x360) is used when present, else synthetic data.
# Tables go to $OUT (default runs/bench/gpu) and to stdout.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
DEEPLAB=${DEEPLAB:-$(dirname "$PY")/deeplab}
OUT=${OUT:-runs/bench/gpu}
mkdir -p "$OUT"
CAMVID=${CAMVID:-../shared/datasets/camvid}

if [ -n "${TINY:-}" ]; then
    DEV=cpu
    E2E=(--variant resnet_18 --crop 64 --batch 2 --steps 2 --warmup 1 --workers 0 --amp off)
    TPUT=(--device cpu --amp off --backbones resnet_18 --size 64 --batch 2 --rounds 1 --quick)
    PRED=(--count 2 --rounds 1 --models recipe)
else
    DEV=cuda
    E2E=(--variant resnet_50 --crop 512 --batch 16 --steps 60 --warmup 10 --workers 12 --amp bf16)
    TPUT=(--device cuda --amp bf16 --backbones resnet_18 resnet_50 --batch 16 --rounds 3 --steps 5
          --warmup 3)
    PRED=(--count 24 --rounds 3)
fi

DATA="$OUT/data"
if [ ! -f "$DATA/dataset.yaml" ]; then
    if [ -z "${TINY:-}" ] && [ -d "$CAMVID/images" ]; then
        "$DEEPLAB" prepare "$CAMVID" --spec datasets/camvid.yaml --output "$DATA" >/dev/null
        IMAGES="$CAMVID/images"
    else
        "$DEEPLAB" synth "$DATA" --num 16 --size 96 128 >/dev/null
        "$DEEPLAB" prepare "$DATA" >/dev/null
    fi
fi
IMAGES=${IMAGES:-$(dirname "$DATA/dataset.yaml")/images}
[ -d "$CAMVID/images" ] && [ -z "${TINY:-}" ] && IMAGES="$CAMVID/images"

echo "== end to end: deeplab train's loop on image files against the peer's ($DEV)"
"$PY" bench/end_to_end.py --data "$DATA/dataset.yaml" --device "$DEV" "${E2E[@]}" \
    --json "$OUT/end_to_end.json" | tee "$OUT/end_to_end.md"
echo "== train and inference step, same settings both sides ($DEV)"
"$PY" bench/throughput.py "${TPUT[@]}" --json "$OUT/throughput.json" | tee "$OUT/throughput.md"
echo "== CPU prediction on this machine's cores, per engine"
"$PY" bench/predict_speed.py --images-dir "$IMAGES" "${PRED[@]}" \
    --json "$OUT/predict_speed.json" | tee "$OUT/predict_speed.md"
echo "== TensorRT fp16 engine against PyTorch and ONNX Runtime on the GPU"
if [ -z "${TINY:-}" ]; then
    "$PY" bench/tensorrt_speed.py | tee "$OUT/tensorrt_speed.md"
else
    "$PY" bench/tensorrt_speed.py --variant resnet_18 --batch 1 --size 64 --rounds 1 --steps 1
fi
