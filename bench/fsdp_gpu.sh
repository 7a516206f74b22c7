#!/bin/bash
# --strategy fsdp on one GPU (NCCL, CUDA DTensors), beside DDP: the CPU tests (tests/test_cluster.py, gloo) cover
# two sharding processes; this checks the CUDA path. A 144M-parameter U-Net (tests/configs/tiny_ldm.yaml widened:
# 192 channels, [1, 2, 4], 2 ResBlocks, attention at 16x16 and 8x8, activation checkpointing) on 64x64 toy images.
#   1. DDP and FSDP, 40 steps each from the same seed: max |difference| over every weight and EMA buffer,
#      seconds per 20 steps and peak GPU memory (both single-process: FSDP's memory gain needs several GPUs)
#   2. FSDP continued with -r for 20 more steps: global step, optimizer step and EMA updates reach 60
#   3. ldm.load_model reads the FSDP checkpoint in one process; its EMA weights are the file's
#   4. FSDP with bf16-mixed, 20 steps
# Results: $OUT/summary.txt and each run's log. Under 5 minutes on an H200.
#
# The lent machine has torch and pytorch-lightning but not omegaconf or submitit: before the call, here,
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 -d .whl omegaconf==2.3.0 submitit==1.5.4
#   python3 -m pip wheel --no-deps -w .whl antlr4-python3-runtime==4.9.3      # an sdist: build the wheel here
# then call it with carry [".whl"]:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && \
#     PYTHONPATH=/tmp/site bash bench/fsdp_gpu.sh
set -u
OUT=${OUT:-/tmp/fsdp_out}; L=${L:-/tmp/fsdp_runs}; PY=${PY:-python3}
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
mkdir -p $OUT $L
P=model.params.unet_config.params
WIDE="$P.model_channels=192 $P.channel_mult=[1,2,4] $P.num_res_blocks=2 $P.attention_resolutions=[2,4]
  $P.image_size=32 $P.use_checkpoint=true model.params.image_size=32
  model.params.first_stage_config.params.ddconfig.resolution=64 data.params.batch_size=16
  data.params.train.params.length=320 data.params.train.params.size=64
  data.params.validation.params.length=32 data.params.validation.params.size=64
  lightning.trainer.accelerator=gpu lightning.trainer.val_check_interval=20 lightning.trainer.limit_val_batches=2
  lightning.callbacks.image_logger.params.batch_frequency=20"
run() {  # name strategy steps [more words]; 20 steps per epoch: EpochStats prints seconds and peak memory
  local n=$1 s=$2 k=$3; shift 3
  $PY main.py -b tests/configs/tiny_ldm.yaml -t -l $L -n $n --devices 1 --strategy $s --max_steps $k $WIDE "$@" \
    > $OUT/$n.log 2>&1
  echo "$n: exit $?; $(grep -E '^Epoch [0-9]+: time' $OUT/$n.log | tr '\n' ';')" >> $OUT/summary.txt
}
: > $OUT/summary.txt
run ddp ddp 40
run fsdp fsdp 40
FSDP_DIR=$(ls -d $L/*_fsdp)
cp $FSDP_DIR/checkpoints/last.ckpt $L/fsdp_step40.ckpt
$PY main.py -r $FSDP_DIR -t --devices 1 --strategy fsdp --max_steps 60 > $OUT/fsdp_resume.log 2>&1
echo "fsdp_resume: exit $?" >> $OUT/summary.txt
run fsdp_bf16 fsdp 20 --precision bf16-mixed
grep -m3 -E "Error|error" $OUT/*.log >> $OUT/summary.txt
$PY bench/fsdp_compare.py $L >> $OUT/summary.txt 2>&1
cat $OUT/summary.txt
