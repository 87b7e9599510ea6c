#!/usr/bin/env bash
# The second call of the 2026-11-30 (night) lease: continue the demo transfer from the export
# of `run.py demo` (README.md) with a fresh warm-up + cosine at half the rate and another shuffle
# seed, on the same GPU data (RefShapes built there, read with this machine's tokenizer).
#   INIT=<export of run.py demo> TOK=<beit3.spm> OUT=<dir> bash experiments/gpu_session/continue.sh
set -euo pipefail
: "${INIT:?export dir to continue from}" "${TOK:?BEiT-3 sentencepiece model}" "${OUT:?out dir}"
D=${DATA:-runs/gpu/data}
W=${WORK:-runs/gpu/cont}
STEPS=${STEPS:-2500}
if [ ! -e "$D/refshapes/default/1.1.0/dataset_info.json" ]; then
  JAX_PLATFORMS=cpu REFJAX_DATA_WORKERS=12 python3 -m refjax build-data refshapes \
    --data-dir "$D" > "$OUT/build.log" 2>&1
fi
rc=0
timeout "${TRAIN_TIMEOUT_S:-190}" python3 -m refjax train \
  --config configs/oneref/rec_res.py:tiny,task=res --workdir "$W" --overwrite \
  --set model.dim=128 --set model.depth=3 --set model.heads=4 --set model.mlp_dim=512 \
  --set data.max_text_len=24 --set model.seg_dim=32 --set model.sim_scale=10.0 \
  --set loss.use_box_loss=True --set loss.use_box_mask_constraint=True \
  --set optim.lr=5e-4 --set optim.warmup_steps=50 --set "init=$INIT" \
  --set "data.data_dir=$D" --set "data.tokenizer_path=$(realpath "$TOK")" \
  --set data.num_workers=14 --set data.batch_size=128 --set train.seed=14 \
  --set train.progress=False --set train.log_every=50 --set "train.total_steps=$STEPS" \
  --set train.eval_every=500 --set train.eval_max_batches=10 --set train.ckpt_every=500 \
  > "$OUT/cont.log" 2>&1 || rc=$?
echo "train rc $rc (124: stopped by the timeout; the last checkpoint stands)"
# params only (5.8 MB); tarred, since an orbax tree is too deep to come back from $OUT as files
rm -rf "$W-export"
# the config written for the machines that read it: no GPU-machine workers, batch or tokenizer
python3 -m refjax export --workdir "$W" --out "$W-export/oneref_cont" \
  --data-dir runs/demo/data --set data.batch_size=32 --set data.num_workers=0 \
  --set data.tokenizer_path=None > "$OUT/export.log" 2>&1
tar czf "$OUT/oneref_cont.tgz" -C "$W-export" oneref_cont
cp "$W/metrics.jsonl" "$W/config.json" "$OUT/"
