#!/usr/bin/env bash
# One prepared run for a session that has a GPU (device tool): SDXL-sized random-weight components.
#   - inference: DisBack 1-step vs bare passes vs 25-step teacher, fp16
#   - one training iteration vs its passes, bf16 autocast, fp32 master weights, gradient checkpointing: s/it, peak memory
#   - the training script under accelerate FSDP2 on one GPU, both stages, a few steps, full and LoRA path nodes
# Results land in $OUT (or ./gpu_smoke_out). CPU dry run at tiny size: SIZE=tiny DEVICE=cpu bash benchmarks/gpu_smoke.sh
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
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
python3 -c "import torch, diffusers, transformers, accelerate, datasets, peft; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" || exit 1
[ "$DEVICE" = cuda ] && nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"

if [ "$SIZE" = sdxl ]; then RES=1024; DT_INF=float16; DT_TRAIN=bfloat16; STEPS=3; else RES=64; DT_INF=float32; DT_TRAIN=float32; STEPS=2; fi

echo "== inference"; python3 benchmarks/inference.py --size "$SIZE" --device "$DEVICE" --dtype "$DT_INF" \
  --repeats 5 --output "$OUT/inference.png" 2>&1 | grep -v "^\[transformers\]" | tee "$OUT/inference.txt"

echo "== training iteration"; python3 benchmarks/train_step.py --size "$SIZE" --device "$DEVICE" --dtype "$DT_TRAIN" \
  --resolution "$RES" --batch_size 1 --gradient_checkpointing --repeats 3 2>&1 | grep -v "^\[transformers\]" \
  | tee "$OUT/train_step.txt"

echo "== training script, FSDP2 on one GPU"
TEACHER=/tmp/disback-teacher-$SIZE
[ -f "$TEACHER/model_index.json" ] || python3 -m diffusers_disback.testing "$TEACHER" --size "$SIZE" >/dev/null
CONFIG=examples/train_disback/configs/fsdp2.yaml; [ "$DEVICE" = cpu ] && CONFIG=examples/train_disback/configs/cpu_demo.yaml
TIMEV=""; [ -x /usr/bin/time ] && TIMEV="/usr/bin/time -v"
for NODES in full lora; do
  $TIMEV python3 -m accelerate.commands.launch --config_file "$CONFIG" --num_processes 1 \
    examples/train_disback/train_disback_sdxl.py --pretrained_teacher_model "$TEACHER" \
    --train_data_files examples/train_disback/data/demo_prompts.txt --output_dir "/tmp/disback-run-$NODES" \
    --resolution "$RES" --degradation_steps "$STEPS" --path_interval 1 --path_node_type "$NODES" \
    --max_train_steps "$STEPS" --fake_score_update_ratio 1 --backtrack_interval 1 --learning_rate 1e-6 \
    --lr_warmup_steps 0 --checkpointing_steps 1000 --validation_steps 0 --report_to none --gradient_checkpointing \
    --allow_tf32 > "$OUT/train_$NODES.log" 2>&1
  echo "path nodes $NODES: rc=$?"; grep -E "s/it]|it/s]|peak GPU memory|Maximum resident" "$OUT/train_$NODES.log" | tail -6
done
