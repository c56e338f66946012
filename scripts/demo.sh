#!/usr/bin/env bash
# `make demo`: the main job on a fresh machine, CPU only, in a few minutes.
#   1. train a small defense on the committed real CIFAR-10 sample and print its evaluation;
#   2. build ONNX Runtime engines from the shipped bundle (trained on all 50,000 CIFAR-10
#      training images; falls back to the bundle of step 1 if it is missing);
#   3. make a 640x480 test video from real photos in which a known third of the frames is
#      attacked with PGD against the classifier;
#   4. run the torch-free runtime on it (ism-edge run) and compare its verdicts with the truth;
#   5. re-calibrate the detector thresholds on a clean clip from the same camera (another pan over
#      the same scenes: ism-edge calibrate) and run the test video again.
# Everything lands in $DEMO_OUT (default: demo-out/).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${DEMO_OUT:-demo-out}"
SHIPPED="models/cifar10-medium"
rm -rf "$OUT"
mkdir -p "$OUT"
start=$(date +%s)
step() { printf '\n\033[1m== %s\033[0m  (%ds)\n' "$1" "$(( $(date +%s) - start ))"; }

step "1/7 train a small defense on 2,000 real CIFAR-10 training images (data/samples/cifar10)"
ism-edge train --preset small --data data/samples/cifar10/train.npz --out "$OUT/bundle" \
    --epochs-classifier 4 --epochs-mapper 3 --epochs-perturbation 2 --batch-size 64 --device cpu

step "2/7 evaluate it on 300 real CIFAR-10 test images (FGSM/PGD, oblivious and known-classifier threat models)"
ism-edge evaluate "$OUT/bundle" --data data/samples/cifar10/test.npz --n 300 --eps 8/255,0.1,0.3 \
    --threat oblivious,known --pgd-steps 10 --device cpu --out "$OUT/eval"

if [ -f "$SHIPPED/manifest.json" ]; then
    BUNDLE="$SHIPPED"
    step "3/7 build ONNX Runtime engines from the shipped bundle ($SHIPPED, trained on all 50,000 training images)"
else
    BUNDLE="$OUT/bundle"
    step "3/7 build ONNX Runtime engines from the bundle of step 1 (no shipped bundle at $SHIPPED)"
fi
ism-edge build "$BUNDLE" --out "$OUT/engines" --backend onnxruntime --precision fp32

step "4/7 make a 640x480 test video from real photos; frames 10-19, 40-49, 70-79 attacked with PGD at eps 8/255, 0.1, 0.3"
python scripts/make_attack_video.py --bundle "$BUNDLE" --photos data/samples/photos --out "$OUT/video" --frames 90 --eps 8/255,0.1,0.3

step "5/7 filter it with the torch-free runtime (ism-edge run, ONNX Runtime on the CPU)"
video=$(python -c "import json,sys; print(json.load(open(sys.argv[1]))['video'])" "$OUT/video/truth.json")
ism-edge run "$OUT/engines" "file://$OUT/video/$video" "file://$OUT/annotated.mp4" --headless \
    --log "$OUT/verdicts.jsonl" --summary-json "$OUT/summary.json"
python scripts/demo_report.py "$OUT/verdicts.jsonl" "$OUT/video/truth.json"

step "6/7 calibrate the thresholds on 300 clean frames of the same camera (another pan over the same photos, 10 s)"
python -c "from ism_edge.bench.frames import load_photos, write_video; import sys
write_video(sys.argv[1], 300, photos=load_photos('data/samples/photos'), per_photo=75)" "$OUT/clean-clip.mkv"
ism-edge calibrate "$OUT/engines" "$OUT/clean-clip.mkv" --fpr 0.02

step "7/7 the test video again, with the calibrated thresholds"
ism-edge run "$OUT/engines" "file://$OUT/video/$video" --headless \
    --log "$OUT/verdicts-calibrated.jsonl" --summary-json "$OUT/summary-calibrated.json"
python scripts/demo_report.py "$OUT/verdicts-calibrated.jsonl" "$OUT/video/truth.json"

printf '\ndemo finished in %ds. Outputs in %s/: bundle/ (trained defense), eval/results.md, engines/,\n' "$(( $(date +%s) - start ))" "$OUT"
printf 'video/ (test video + truth.json), annotated.mp4 (labels, scores, red border when flagged), verdicts.jsonl,\n'
printf 'clean-clip.mkv (calibration frames), verdicts-calibrated.jsonl (the same video after calibration)\n'
