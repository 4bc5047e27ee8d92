#!/usr/bin/env bash
# One prepared run for a session that has a GPU (device tool): SDXL-sized random-weight components.
#   1. inference: DisBack 1-step vs bare passes vs 25-step teacher, fp16
#   2. one training iteration (the library's BacktrackingStep) vs its passes, bf16 autocast, fp32 master weights,
#      frozen teacher in bf16, gradient checkpointing, batch 1/2/4: s/it, peak memory, GPU-busy fraction, operators
#      per iteration (full fine-tuning of generator and fake score: about 90 GB, so an H200 or a sharded run)
#   3. the training script on one GPU, both stages, a few steps at 1024², batch 1, LoRA path nodes and LoRA
#      generator/fake score: the shared-base mode (--lora_base shared, the default) against the separate networks
#      (--lora_base separate) in the same session: peak memory per stage and s/it (a full-weight run writes ~60 GB of
#      checkpoints, more than the device's disk); benchmarks/memory.py's CPU accounting beside them
#   4. disback export-lora on that run: its adapter as it is, and a rank-64 truncated-SVD LoRA of the merged
#      SDXL-sized UNet against the teacher (time, size, per-layer error)
#   5. train_disback_sd3.py on one GPU with an SD3.5-Medium-sized random-weight teacher without T5 (1024², batch 1,
#      LoRA on the shared base, gradient checkpointing, text encoders offloaded, bf16): peak memory per stage and
#      s/it, beside benchmarks/memory.py --family sd3.5-medium's count (which includes T5-XXL's 8.9 GiB)
# Each section has its own time limit so one slow part cannot take the others with it. Results land in $OUT
# (or ./gpu_smoke_out). CPU dry run at tiny size: SIZE=tiny DEVICE=cpu bash benchmarks/gpu_smoke.sh
# The device image has no diffusers/datasets: carry them as wheels in .whl (see the device tool's README).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_smoke_out}; mkdir -p "$OUT"
SIZE=${SIZE:-sdxl}; DEVICE=${DEVICE:-cuda}
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD/src
else
  export PYTHONPATH=$PWD/src
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 -c "import torch, diffusers, transformers, accelerate, datasets, peft; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'diffusers', diffusers.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__)" | tee "$OUT/versions.txt" || exit 1
[ "$DEVICE" = cuda ] && nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"

if [ "$SIZE" = sdxl ]; then RES=1024; DT_INF=float16; DT_TRAIN=bfloat16; STEPS=2; T_INF=110; T_STEP=120; T_RUN=200
else RES=64; DT_INF=float32; DT_TRAIN=float32; STEPS=2; T_INF=300; T_STEP=300; T_RUN=300; fi

# the teacher folder for section 3 is written in the background while sections 1-2 use the GPU
TEACHER=/tmp/disback-teacher-$SIZE
( python3 -m diffusers_disback.testing "$TEACHER" --size "$SIZE" > "$OUT/teacher_build.log" 2>&1 ) &
BUILD=$!
# and section 5's SD3 teacher (SD3.5-Medium-sized without T5, or the tiny SD3 one for the CPU dry run)
SD3_SIZE=sd3.5-medium; [ "$SIZE" = sdxl ] || SD3_SIZE=tiny
SD3_TEACHER=/tmp/disback-teacher-sd3-$SD3_SIZE
( python3 -m diffusers_disback.testing "$SD3_TEACHER" --family sd3 --size "$SD3_SIZE" > "$OUT/teacher_sd3_build.log" 2>&1 ) &
BUILD_SD3=$!

echo "== inference"; timeout $T_INF python3 benchmarks/inference.py --size "$SIZE" --device "$DEVICE" --dtype "$DT_INF" \
  --repeats 5 --output "$OUT/inference.png" 2>&1 | grep -v "^\[transformers\]" | tee "$OUT/inference.txt"

# the training engine's stage-2 iteration (r = 1) at batch 1, 2, 4 per GPU: s/it, peak memory, and with --profile the
# GPU-busy fraction and the operators dispatched per iteration (the #9 goal: >= 70% busy at batch 1)
for BS in 1 2 4; do
  echo "== training iteration, batch $BS"; timeout $T_STEP python3 benchmarks/train_step.py --size "$SIZE" \
    --device "$DEVICE" --dtype "$DT_TRAIN" --resolution "$RES" --batch_size "$BS" --gradient_checkpointing --repeats 3 \
    --profile 2>&1 | grep -v "^\[transformers\]" | tee "$OUT/train_step_bs$BS.txt" | grep -E "^\| one iteration|peak|GPU busy|aten ops"
done

echo "== training script, one GPU, LoRA: shared base vs separate networks"
wait $BUILD; tail -2 "$OUT/teacher_build.log"
CONFIG=examples/train_disback/configs/single_gpu.yaml; [ "$DEVICE" = cpu ] && CONFIG=examples/train_disback/configs/cpu_demo.yaml
TIMEV=""; [ -x /usr/bin/time ] && TIMEV="/usr/bin/time -v"
python3 benchmarks/memory.py --num_path_nodes "$STEPS" --no_activations --report "$OUT/memory.md" > "$OUT/memory.txt" 2>&1
grep -E "^\| (full|lora)" "$OUT/memory.txt"
for BASE in separate shared; do  # shared last: /tmp/disback-run is its run, exported below
  rm -rf /tmp/disback-run
  timeout $T_RUN $TIMEV python3 -m accelerate.commands.launch --config_file "$CONFIG" --num_processes 1 \
    examples/train_disback/train_disback_sdxl.py --pretrained_teacher_model "$TEACHER" \
    --train_data_files examples/train_disback/data/demo_prompts.txt --output_dir /tmp/disback-run \
    --resolution "$RES" --degradation_steps "$STEPS" --path_interval 1 --path_node_type lora --lora_rank 64 \
    --lora_base "$BASE" --max_train_steps "$STEPS" --fake_score_update_ratio 1 --backtrack_interval 1 \
    --learning_rate 1e-6 --lr_warmup_steps 0 --checkpointing_steps 1000 --checkpoints_total_limit 1 \
    --validation_steps 0 --report_to none --path_profile_prompts 2 --gradient_checkpointing --allow_tf32 \
    > "$OUT/train_lora_$BASE.log" 2>&1
  echo "script --lora_base $BASE rc=$?"
  grep -E "s/it\]|it/s\]|peak GPU memory|Maximum resident|Error|error" "$OUT/train_lora_$BASE.log" | tail -8
done
df -h /tmp | tail -1

echo "== export-lora, the run's adapter and a rank-64 SVD of the merged UNet"
for EXTRA in "" "--rank 64 --no-kohya"; do
  timeout 300 $TIMEV python3 -m diffusers_disback.cli export-lora /tmp/disback-run/final --output "/tmp/lora${EXTRA// /}" \
    --base-model "$TEACHER" --device "$DEVICE" $EXTRA > "$OUT/export_lora${EXTRA// /}.log" 2>&1
  echo "export-lora $EXTRA rc=$?"; grep -E "^(source|size_mb|layers|rank_|relative_error|not_repr)|Elapsed|Maximum resident" \
    "$OUT/export_lora${EXTRA// /}.log"
done

echo "== SD3.5-Medium-sized teacher (no T5): train_disback_sd3.py on one GPU, LoRA on the shared base"
wait $BUILD_SD3; tail -1 "$OUT/teacher_sd3_build.log"
python3 benchmarks/memory.py --family sd3.5-medium --num_path_nodes "$STEPS" --no_activations \
  --report "$OUT/memory_sd3.md" > "$OUT/memory_sd3.txt" 2>&1
grep -E "^\| (full|lora)" "$OUT/memory_sd3.txt"
rm -rf /tmp/disback-run-sd3
timeout $T_RUN $TIMEV python3 -m accelerate.commands.launch --config_file "$CONFIG" --num_processes 1 \
  examples/train_disback/train_disback_sd3.py --pretrained_teacher_model "$SD3_TEACHER" \
  --train_data_files examples/train_disback/data/demo_prompts.txt --output_dir /tmp/disback-run-sd3 \
  --resolution "$RES" --degradation_steps "$STEPS" --path_interval 1 --path_node_type lora --lora_rank 64 \
  --max_train_steps "$STEPS" --fake_score_update_ratio 1 --backtrack_interval 1 --learning_rate 1e-6 \
  --lr_warmup_steps 0 --checkpointing_steps 1000 --checkpoints_total_limit 1 --validation_steps 0 --report_to none \
  --path_profile_prompts 2 --gradient_checkpointing --offload_text_encoders --allow_tf32 \
  > "$OUT/train_sd3_lora_shared.log" 2>&1
echo "sd3 script rc=$?"
grep -E "s/it\]|it/s\]|peak GPU memory|Maximum resident|Error|error" "$OUT/train_sd3_lora_shared.log" | tail -8
