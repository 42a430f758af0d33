#!/usr/bin/env bash
# Train the synthetic-data networks on one GPU: three runs side by side for MINUTES minutes each.
# Small 3D convolutions at 64^3 leave one process launch-bound with most of the card idle, so
# three runs share it at little cost to each. Pairs are drawn on the GPU (SynthDataModule
# device: auto). Writes each run's metrics.csv and last checkpoint to OUT, the runs' logs to
# OUT/train.log, and the card's memory and load every 10 s to OUT/smi.csv.
#
#   OUT=runs/gpu MINUTES=8 bash benchmarks/synth_gpu.sh
#
# The runs: svf (configs/synth_svf.yaml, one contrast per pair), affine_svf
# (configs/synth_affine_svf.yaml, centroid affine + SVF) and svf_cross (synth_svf.yaml with half the
# pairs in two independent contrasts after a 4000-batch warm-up).
set -u
OUT=${OUT:-runs/gpu}
MINUTES=${MINUTES:-8}
mkdir -p "$OUT"
# A machine without the project's environment (a lent GPU): wheels carried in .whl for
# LightningCLI's parser, and SimpleITK left out (training reads and writes no images).
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
if ! python3 -c "import SimpleITK" 2>/dev/null; then
  mkdir -p /tmp/stub/SimpleITK && touch /tmp/stub/SimpleITK/__init__.py
  export PYTHONPATH=/tmp/stub:${PYTHONPATH:-}
fi
# Plain torch kernels on the GPU: the Triton paths were never run on a card (issue 6).
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1 STNREG_FAST=0
nvidia-smi -L
python3 -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__)"
nvidia-smi --query-gpu=timestamp,memory.used,utilization.gpu --format=csv -l 10 >"$OUT/smi.csv" &
smi=$!

run() {
  local name=$1 config=$2
  shift 2
  local dir=/tmp/synth_$name
  sed "s#runs/synth_[a-z_]*#$dir#g" "$config" >"/tmp/$name.yaml"
  local t0
  t0=$(date +%s)
  python3 -m stnreg.cli fit --config "/tmp/$name.yaml" --trainer.max_time "00:00:$(printf %02d "$MINUTES"):00" \
    --trainer.enable_progress_bar false "$@" >"/tmp/$name.log" 2>&1
  echo "exit $? after $(($(date +%s) - t0)) s" >>"/tmp/$name.log"
  cp "$dir"/csv/version_0/metrics.csv "$OUT/$name-metrics.csv"
  cp "$dir"/csv/version_0/checkpoints/last.ckpt "$OUT/$name.ckpt"
}

run svf configs/synth_svf.yaml &
a=$!
run affine_svf configs/synth_affine_svf.yaml &
b=$!
run svf_cross configs/synth_svf.yaml --data.same_contrast 0.5 --data.contrast_warmup 4000 &
c=$!
wait "$a" "$b" "$c"
kill "$smi"
for name in svf affine_svf svf_cross; do
  echo "== $name"
  cat "/tmp/$name.log"
done >"$OUT/train.log"
grep -h -A3 "^== \|exit" "$OUT/train.log" | tail -n 30
