#!/usr/bin/env bash
# The whole pipeline on the built-in sample, on 2 CPU workers, in a few minutes:
# a tiny random HuggingFace Llama → MindSpore checkpoint → alpaca → conversations → MindRecord
# → full fine-tuning over msrun (2 workers) → loss curve → generation from the fine-tuned
# checkpoint, and back to a HuggingFace folder.
# Usage: bash scripts/demo.sh [WORK_DIR]   (default: demo_output)
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${VIRTUAL_ENV:-}" ]]; then
  echo "== 0. environment (.venv)"
  bash scripts/setup_env.sh
  . .venv/bin/activate
fi
export GLOG_v=${GLOG_v:-3}
WORK=${1:-demo_output}
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)

echo "== 1. a tiny random Llama in HuggingFace format (with a tokenizer trained on the sample)"
python -c "from mindsft.demo_model import write_tiny_hf_llama; write_tiny_hf_llama('$WORK/tiny-llama-hf')"

echo "== 2. HuggingFace → MindSpore checkpoint"
python tools/convert_weight.py --model llama --input_path "$WORK/tiny-llama-hf" --output_path "$WORK/tiny-llama.ckpt"

echo "== 3. alpaca → conversations"
python tools/alpaca_converter.py --data_path mindsft/sample_data/alpaca_sample.json \
    --output_path "$WORK/alpaca-conversation.json"

echo "== 4. conversations → MindRecord (seq_length 256)"
mkdir -p "$WORK/mindrecord"
python tools/llama_preprocess.py --dataset_type qa --input_glob "$WORK/alpaca-conversation.json" \
    --model_file "$WORK/tiny-llama-hf/tokenizer.model" --seq_length 256 \
    --output_file "$WORK/mindrecord/alpaca.mindrecord"

echo "== 5. full fine-tuning on 2 workers with msrun"
bash scripts/msrun_launcher.sh "run_mindformer.py --config configs/llama2/finetune_llama_tiny_cpu.yaml \
    --run_mode finetune --load_checkpoint $WORK/tiny-llama.ckpt --train_dataset_dir $WORK/mindrecord \
    --output_dir $WORK/output --use_parallel True --batch_size 2 --epochs 15" \
    2 8118 "$WORK/msrun_log" True 600
tail -n 4 "$WORK/msrun_log/worker_0.log"

echo "== 6. fine-tuned weights → HuggingFace folder (the model's config travels beside the checkpoint)"
python tools/convert_weight.py --reversed --input_path "$WORK/output/checkpoint/llama_tiny_final.ckpt" \
    --output_path "$WORK/tiny-llama-finetuned-hf" --tokenizer_dir "$WORK/tiny-llama-hf"

echo "== 7. ask the fine-tuned model (in the template its training data used), then score it on the sample"
PREDICT="python run_mindformer.py --config configs/llama2/finetune_llama_tiny_cpu.yaml --run_mode predict
    --load_checkpoint $WORK/output/checkpoint/llama_tiny_final.ckpt
    --processor.tokenizer.vocab_file $WORK/tiny-llama-hf/tokenizer.model --max_new_tokens 24"
$PREDICT --predict_data "$(python -c 'from mindsft.templates import alpaca_prompt; print(alpaca_prompt("What is the capital of France?"))')" \
    --output_dir "$WORK/predict"
$PREDICT --predict_data mindsft/sample_data/alpaca_sample.json --output_dir "$WORK/eval"
python -c "import json; m = json.load(open('$WORK/eval/predict_results.json')); print({k: round(m[k], 2) for k in ('bleu-4', 'rouge-1', 'rouge-l', 'eval_loss', 'decode_tokens_per_second')})"

echo "done: loss curve $WORK/output/training_loss.png, metrics $WORK/output/metrics.jsonl,"
echo "      predictions $WORK/predict/generated_predictions.jsonl and $WORK/eval/generated_predictions.jsonl,"
echo "      fine-tuned model $WORK/tiny-llama-finetuned-hf"
