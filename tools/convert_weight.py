"""Convert Llama weights between HuggingFace and MindSpore formats, streaming tensor by tensor.

  HuggingFace → MindSpore:
    python tools/convert_weight.py --model llama --input_path HF_DIR --output_path OUT.ckpt [--dtype bf16]
  MindSpore → HuggingFace:
    python tools/convert_weight.py --model llama --reversed --input_path IN.ckpt --output_path HF_DIR \\
        (--config RUN.yaml | --hf_config config.json) [--tokenizer_dir DIR] [--max_shard_size 5GB]

Command line compatible with MindFormers' convert_weight.py. Peak memory stays near one 16 MiB
block whatever the model size; outputs appear only when complete.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mindsft.cli import HelpFormatter  # noqa: E402
from mindsft.errors import MindsftError  # noqa: E402

MODELS = ("llama", "llama2", "llama3")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--model", default="llama", help=f"model family: {', '.join(MODELS)}")
    parser.add_argument("--input_path", required=True,
                        help="HuggingFace folder or weights file (forward), or a .ckpt (with --reversed)")
    parser.add_argument("--output_path", required=True,
                        help="the .ckpt to write (forward), or the HuggingFace folder to write (with --reversed)")
    parser.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"],
                        help="output dtype (default: keep each tensor's dtype; bf16 stays bit-exact)")
    parser.add_argument("--reversed", action="store_true", help="convert MindSpore .ckpt → HuggingFace folder")
    parser.add_argument("--config", default=None,
                        help="with --reversed: MindFormers-style run YAML whose model.model_config describes the model")
    parser.add_argument("--hf_config", default=None, help="with --reversed: a HuggingFace config.json instead of --config")
    parser.add_argument("--tokenizer_dir", default=None,
                        help="with --reversed: folder whose tokenizer files are copied into the output")
    parser.add_argument("--max_shard_size", default="5GB", help="with --reversed: largest safetensors shard")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.model.lower() not in MODELS:
        parser.error(f"--model {args.model!r} is not supported (choose from {', '.join(MODELS)})")
    if args.reversed and not (args.config or args.hf_config):
        parser.error("--reversed needs the model's config: --config RUN.yaml or --hf_config config.json")
    if args.config and args.hf_config:
        parser.error("give --config or --hf_config, not both")
    return args


def main(argv=None):
    args = parse_args(argv)
    from mindsft import convert
    try:
        if args.reversed:
            llama_config = (convert.llama_config_from_yaml(args.config) if args.config
                            else convert.llama_config_from_hf_json(args.hf_config))
            summary = convert.ms_to_hf(args.input_path, args.output_path, llama_config, dtype=args.dtype,
                                       max_shard_size=args.max_shard_size, tokenizer_dir=args.tokenizer_dir,
                                       progress=not args.no_progress)
        else:
            summary = convert.hf_to_ms(args.input_path, args.output_path, dtype=args.dtype,
                                       progress=not args.no_progress)
    except MindsftError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(convert.format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
