#!/usr/bin/env bash
# The whole pipeline on the built-in sample, on 2 CPU workers, in a few minutes:
# a tiny random HuggingFace Llama → MindSpore checkpoint → alpaca → conversations → MindRecord
# → full fine-tuning over msrun (2 workers) → loss curve → generation from the fine-tuned
# checkpoint, back to a HuggingFace folder, one chat turn, and a DPO stage on preference pairs.
# Usage: bash scripts/demo.sh [--family llama|llama3|qwen2|qwen3|mistral|baichuan2] [WORK_DIR]
#        (default: llama, demo_output): the same pipeline for a tiny random model of that family.
set -euo pipefail
FAMILY=llama
if [[ "${1:-}" == "--family" ]]; then
  FAMILY=${2:?--family needs a name}
  shift 2
fi
case "$FAMILY" in
  llama) CONFIG=configs/llama2/finetune_llama_tiny_cpu.yaml; PREFIX=llama_tiny ;;
  llama3|qwen2|qwen3|mistral|baichuan2) CONFIG=configs/$FAMILY/finetune_${FAMILY}_tiny_cpu.yaml; PREFIX=${FAMILY}_tiny ;;
  *) echo "demo.sh: --family $FAMILY is not one of llama, llama3, qwen2, qwen3, mistral, baichuan2" >&2; exit 2 ;;
esac
cd "$(dirname "$0")/.."
if [[ -z "${VIRTUAL_ENV:-}" ]]; then
  echo "== 0. environment (.venv)"
  bash scripts/setup_env.sh
  . .venv/bin/activate
fi
export GLOG_v=${GLOG_v:-3}
WORK=${1:-demo_output}
MODEL=tiny-$FAMILY
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)

echo "== 1. a tiny random $FAMILY model in HuggingFace format (with a tokenizer of its kind trained on the sample)"
python -c "from mindsft.demo_model import write_tiny_hf_llama; write_tiny_hf_llama('$WORK/$MODEL-hf', family='$FAMILY')"

echo "== 2. HuggingFace → MindSpore checkpoint"
python tools/convert_weight.py --model "$FAMILY" --input_path "$WORK/$MODEL-hf" --output_path "$WORK/$MODEL.ckpt"

echo "== 3. alpaca → conversations"
python tools/alpaca_converter.py --data_path mindsft/sample_data/alpaca_sample.json \
    --output_path "$WORK/alpaca-conversation.json"

echo "== 4. conversations → MindRecord (seq_length 256)"
mkdir -p "$WORK/mindrecord"
python tools/llama_preprocess.py --dataset_type qa --input_glob "$WORK/alpaca-conversation.json" \
    --model_file "$WORK/$MODEL-hf" --seq_length 256 \
    --output_file "$WORK/mindrecord/alpaca.mindrecord"

echo "== 5. full fine-tuning on 2 workers with msrun"
bash scripts/msrun_launcher.sh "run_mindformer.py --config $CONFIG \
    --run_mode finetune --load_checkpoint $WORK/$MODEL.ckpt --train_dataset_dir $WORK/mindrecord \
    --output_dir $WORK/output --use_parallel True --batch_size 2 --epochs 15" \
    2 8118 "$WORK/msrun_log" True 600

echo "== 6. fine-tuned weights → HuggingFace folder (the model's config travels beside the checkpoint)"
python tools/convert_weight.py --reversed --input_path "$WORK/output/checkpoint/${PREFIX}_final.ckpt" \
    --output_path "$WORK/$MODEL-finetuned-hf" --tokenizer_dir "$WORK/$MODEL-hf"

echo "== 7. ask the fine-tuned model (in the template its training data used), then score it on the sample"
PREDICT="python run_mindformer.py --config $CONFIG --run_mode predict
    --load_checkpoint $WORK/output/checkpoint/${PREFIX}_final.ckpt
    --processor.tokenizer.vocab_file $WORK/$MODEL-hf --max_new_tokens 24"
$PREDICT --predict_data "$(python -c 'from mindsft.templates import alpaca_prompt; print(alpaca_prompt("What is the capital of France?"))')" \
    --output_dir "$WORK/predict"
$PREDICT --predict_data mindsft/sample_data/alpaca_sample.json --output_dir "$WORK/eval"
python -c "import json; m = json.load(open('$WORK/eval/predict_results.json')); print({k: round(m[k], 2) for k in ('bleu-4', 'rouge-1', 'rouge-l', 'eval_loss', 'decode_tokens_per_second')})"

echo "== 8. one chat turn with the fine-tuned model (python tools/chat.py ... for a conversation, tools/serve.py for an API)"
printf 'What is the capital of France?\n/exit\n' | python tools/chat.py --config $CONFIG \
    --load_checkpoint $WORK/output/checkpoint/${PREFIX}_final.ckpt --vocab_file $WORK/$MODEL-hf --max_new_tokens 24

echo "== 9. preference tuning after SFT: DPO with a LoRA adapter (its reference: the SFT model, adapters off)"
python tools/llama_preprocess.py --dataset_type pairwise --input_glob mindsft/sample_data/pairwise_sample.json \
    --model_file "$WORK/$MODEL-hf" --seq_length 256 --output_file "$WORK/pairs/pairs.mindrecord"
python run_mindformer.py --config $CONFIG --run_mode finetune --stage dpo --pref_beta 0.5 \
    --finetuning_type lora --lora_rank 8 --load_checkpoint "$WORK/output/checkpoint/${PREFIX}_final.ckpt" \
    --train_dataset_dir "$WORK/pairs" --output_dir "$WORK/dpo" --batch_size 4 --epochs 4 --use_parallel False \
    --optimizer.learning_rate 5e-3 --lr_schedule.learning_rate 5e-3
python -c "import json; rows = [json.loads(l) for l in open('$WORK/dpo/metrics.jsonl') if 'loss' in l]; print({k: round(rows[-1][k], 3) for k in ('loss', 'rewards/accuracies', 'rewards/margins')})"

echo "done: loss curve $WORK/output/training_loss.png, metrics $WORK/output/metrics.jsonl,"
echo "      predictions $WORK/predict/generated_predictions.jsonl and $WORK/eval/generated_predictions.jsonl,"
echo "      fine-tuned model $WORK/$MODEL-finetuned-hf, DPO adapter $WORK/dpo/peft_adapter"
