#!/bin/bash
# Screen of training recipes for the tiny Shapes class / text LDMs on one GPU: each variant trains in its
# own process (all at once), then the Shapes probe scores 200 samples of each checkpoint (DDIM 50, guidance
# 3, and 1 for the last). Results: $OUT/summary.txt (one line per checkpoint, "<run>_<step>_s<scale>").
#
#   AE=<kl_f2_shapes_tiny weights> TEXT_ENCODER=<MiniLM folder> LDM_CACHE=<folder holding probe/> \
#   RUNS="c16 c32snr" bash bench/shapes_ldm_screen.sh
#
# ACC=cpu K=1000 runs the same with steps / 1000 (a smoke test); MAXT caps each run's training time.
# The runs' figures are in bench/README.md.
set -u
ACC=${ACC:-gpu}; MAXT=${MAXT:-00:00:06:00}; K=${K:-1}; OUT=${OUT:-/tmp/screen_out}; L=${L:-/tmp/screen}
: "${AE:?set AE to the kl_f2_shapes_tiny checkpoint}"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
PY=${PY:-python3}
mkdir -p $OUT $L/ev
C=configs/diffusion/ldm_shapes_class_tiny.yaml; T=configs/diffusion/ldm_shapes_text_tiny.yaml
TXT=${TEXT_ENCODER:+model.params.cond_stage_config.params.version=$TEXT_ENCODER}
OLD="model.params.snr_gamma=null"   # the configs' recipe before the screen: no min-SNR weighting
run() {  # name config batch lr steps ckpt_every [overrides]
  local n=$1 cfg=$2 b=$3 lr=$4 s=$(( $5 / K )) e=$(( $6 / K )); shift 6
  $PY main.py -b $cfg -t -l $L -n $n --accelerator $ACC --devices 1 --no-scale_lr --no-test \
    model.base_learning_rate=$lr data.params.batch_size=$b data.params.num_workers=1 \
    model.params.first_stage_config.params.ckpt_path=$AE lightning.callbacks.image_logger=null \
    lightning.trainer.max_steps=$s lightning.trainer.max_time=$MAXT \
    lightning.modelcheckpoint.params.every_n_train_steps=$e lightning.modelcheckpoint.params.save_top_k=-1 \
    lightning.modelcheckpoint.params.monitor=null "$@" > $L/train_$n.log 2>&1 &
}
variant() {  # name -> run arguments
  case $1 in
    c16)      run c16      $C 16 1e-3 12000 3000 $OLD ;;
    c32)      run c32      $C 32 1e-3 8000 2000 $OLD ;;
    c64)      run c64      $C 64 1e-3 6000 1500 $OLD ;;
    c64lr2)   run c64lr2   $C 64 2e-3 6000 1500 $OLD ;;
    c32rb2)   run c32rb2   $C 32 1e-3 8000 2000 $OLD model.params.unet_config.params.num_res_blocks=2 ;;
    c32w64na) run c32w64na $C 32 1e-3 6000 1500 $OLD model.params.unet_config.params.model_channels=64 \
                "model.params.unet_config.params.attention_resolutions=[]" ;;
    c16snr)   run c16snr   $C 16 1e-3 8000 1000 ;;
    c32snr)   run c32snr   $C 32 1e-3 8000 2000 ;;
    c64snr)   run c64snr   $C 64 1e-3 6000 1000 ;;
    t32)      run t32      $T 32 1e-3 8000 2000 $OLD $TXT ;;
    t64)      run t64      $T 64 1e-3 6000 1500 $OLD $TXT ;;
    t32snr)   run t32snr   $T 32 1e-3 8000 2000 $TXT ;;
    t64snr)   run t64snr   $T 64 1e-3 6000 1500 $TXT ;;
    *) echo "unknown variant $1"; exit 2 ;;
  esac
}
RUNS=${RUNS:-c16 c32 c64 c64lr2 c32snr c32rb2 c32w64na t32 t64}
for n in $RUNS; do variant $n; done
wait
evaluate() {  # run-name checkpoint scale
  local r=$(ls -d $L/*_$1) tag="$1_$(basename $2 .ckpt | sed 's/.*step=0*//')_s$3"
  $PY scripts/evaluate.py --run $r --ckpt $2 --task conditional --n $(( 200 / K > 4 ? 200 / K : 4 )) \
      --scale $3 --batch_size 100 --out $L/ev/$tag.json > $L/ev/$tag.log 2>&1 \
    || { echo "evaluation failed: $tag: $(tail -3 $L/ev/$tag.log)"; return; }
  $PY - $L/ev/$tag.json "$tag" >> $OUT/summary.txt <<'PY'
import json, sys
metrics = json.load(open(sys.argv[1]))["metrics"]
print(sys.argv[2], " ".join(f"{k}={v:.3f}" for k, v in sorted(metrics.items())
                            if isinstance(v, float) and not k.endswith("samples") and not k.startswith("probe_")))
PY
}
for n in $RUNS; do
  r=$(ls -d $L/*_$n 2>/dev/null) || { echo "no run $n"; continue; }
  ckpts=$(ls $r/checkpoints/*step=*.ckpt 2>/dev/null | sort)
  [ -z "$ckpts" ] && { echo "$n: no checkpoint"; tail -5 $L/train_$n.log; continue; }
  echo "$n: $(echo $ckpts | wc -w) checkpoints; $(grep -o 'time/epoch_s [0-9.]*' $L/train_$n.log | tail -1)" | tee -a $OUT/summary.txt
  for c in $ckpts; do evaluate $n $c 3 & done
  evaluate $n "$(echo "$ckpts" | tail -1)" 1 &
  while [ $(jobs -r | wc -l) -ge 8 ]; do sleep 1; done
done
wait
sort $OUT/summary.txt
