#!/usr/bin/env bash
# The main job on the embedded default: synthetic layers -> train -> eval -> export -> predict.
# Uses exactly the `inspect3d` commands a user would type. Usage: scripts/demo.sh [OUT_DIR]
set -euo pipefail
OUT=${1:-outputs/demo}
EPOCHS=${DEMO_EPOCHS:-30}
SIZE=${DEMO_SIZE:-512}   # synthetic layer size = model input size
JOBS=${DEMO_JOBS:-24}
rm -rf "$OUT"
mkdir -p "$OUT"
step() { printf '\n== %s\n' "$*"; }
start=$(date +%s)

step "1/8 synthetic powder-bed jobs: training (seed 0), validation (seed 3), held-out (seed 1)"
inspect3d synth out="$OUT/synth" seed=0 n_jobs="$JOBS" layers_per_job=16 size="$SIZE"
# a validation folder of its own: all training jobs train (each defect has only a few jobs)
inspect3d synth out="$OUT/val" seed=3 n_jobs=8 layers_per_job=16 size="$SIZE"
inspect3d synth out="$OUT/holdout" seed=1 n_jobs=8 layers_per_job=16 size="$SIZE"

step "2/8 train: ImageNet Lite0 read at stride 8, frozen, + a head ($EPOCHS epochs at ${SIZE} px)"
inspect3d train experiment=probe_s8 data=folder data.root="$OUT/synth" data.val_root="$OUT/val" \
  data.normal_class=ok \
  data.height="$SIZE" data.width="$SIZE" trainer.epochs="$EPOCHS" trainer.batch_size=8 \
  hydra.run.dir="$OUT/run"

step "3/8 evaluate on the held-out jobs (never seen in training)"
inspect3d eval run="$OUT/run" data=folder data.root="$OUT/holdout" data.normal_class=ok

step "4/8 export to ONNX and check it against torch"
inspect3d export run="$OUT/run"

step "5/8 score held-out layers with onnxruntime"
mapfile -t layers < <(find "$OUT/holdout" -path '*/_*' -prune -o -name '*__0015.png' -print | sort)
inspect3d predict "$OUT/run/model.onnx" "${layers[@]}" --overlay-dir "$OUT/overlays"

step "6/8 watcher: replay the held-out jobs into an inbox as 3 printers would, decide per job"
inspect3d simulate data="$OUT/holdout" inbox="$OUT/inbox" printers=3 rate=20
inspect3d watch model="$OUT/run/model.onnx" inbox="$OUT/inbox" state="$OUT/watch" until_idle=true
inspect3d status state="$OUT/watch" --jobs

step "7/8 QA report: shop summary and one page per job, with defect maps and layer records"
inspect3d report state="$OUT/watch" out="$OUT/report"

step "8/8 normal-only: a model from good layers alone (no defect labels), maps checked on masks"
inspect3d fit-normal data=folder data.root="$OUT/synth" data.normal_class=ok \
  normal.max_layers=24 hydra.run.dir="$OUT/normal"
inspect3d eval run="$OUT/normal" data=folder data.root="$OUT/holdout" data.normal_class=ok \
  data.mask_root="$OUT/holdout/_masks"
inspect3d export run="$OUT/normal"

printf '\n== done in %ss. Outputs:\n' "$(( $(date +%s) - start ))"
printf '  %-34s %s\n' \
  "$OUT/run/checkpoint.pt" "checkpoint (weights, config, classes, threshold)" \
  "$OUT/run/metrics.json" "validation metrics; curves.png, confusion.png beside it" \
  "$OUT/run/eval.json" "held-out metrics; eval_predictions.csv beside it" \
  "$OUT/run/model.onnx" "the model for scoring (inspect3d predict / OnnxModel)" \
  "$OUT/overlays/" "defect-map overlays of the scored layers" \
  "$OUT/watch/" "watcher state: SQLite db, rejects.jsonl, review/ evidence" \
  "$OUT/report/index.html" "QA report (then: inspect3d review state=$OUT/watch port=8765)" \
  "$OUT/normal/model.onnx" "normal-only model (good layers only); eval.json: pixel AUROC, AUPRO"
