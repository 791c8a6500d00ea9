"""Fold LoRA adapters into base weights: a MindSpore checkpoint and/or a HuggingFace folder."""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mindsft.cli import HelpFormatter  # noqa: E402
from mindsft.config import load_run_config  # noqa: E402
from mindsft.convert.peft import merge_lora_files  # noqa: E402
from mindsft.errors import MindsftError, report, user_errors  # noqa: E402
from mindsft.output_files import check_output_path  # noqa: E402
from mindsft.lora_config import LoraConfig  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        formatter_class=HelpFormatter,
        description="Merge LoRA adapters into base weights (W + alpha/rank * B A). The base is a "
                    "MindSpore .ckpt (MindFormers names) or a HuggingFace model folder; the adapter is a "
                    "PEFT folder (adapter_model.safetensors + adapter_config.json) or an adapter .ckpt "
                    "saved by a mindsft LoRA run (then --config or --lora_rank/--lora_alpha say its scaling).")
    parser.add_argument("--base", required=True, help="base weights: .ckpt file or HuggingFace folder")
    parser.add_argument("--adapter", required=True, help="PEFT adapter folder or adapter .ckpt")
    parser.add_argument("--output", help="merged MindSpore checkpoint to write (.ckpt)")
    parser.add_argument("--hf_output", help="merged HuggingFace folder to write (loads in transformers)")
    parser.add_argument("--config", help="the run's YAML: its LoRA settings (for an adapter .ckpt) and any model "
                                         "setting the base's own config (X.config.json beside X.ckpt) lacks")
    parser.add_argument("--lora_rank", type=int, help="rank of an adapter .ckpt (instead of --config)")
    parser.add_argument("--lora_alpha", type=float, help="alpha of an adapter .ckpt (instead of --config)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing --hf_output folder that holds a previous conversion "
                             "(a folder holding anything else is never replaced)")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if not args.output and not args.hf_output:
        parser.error("give --output, --hf_output or both")
    return args


def main(argv=None):
    args = parse_args(argv)
    lora_config = model_config = None
    try:
        # Output paths first: a folder in the way is found before any file is read.
        if args.output:
            check_output_path(args.output)
        if args.hf_output:
            check_output_path(args.hf_output, folder=True, overwrite=args.overwrite)
        if args.config:
            # The base's own config (beside a converted .ckpt, or an HF folder's) fills what the YAML leaves out.
            run_config = load_run_config(args.config, {"load_checkpoint": args.base})
            model_config, lora_config = run_config.model_config, run_config.lora
        if args.lora_rank is not None or args.lora_alpha is not None:
            if args.lora_rank is None or args.lora_alpha is None:
                raise MindsftError("give both --lora_rank and --lora_alpha")
            lora_config = LoraConfig(rank=args.lora_rank, alpha=args.lora_alpha)
        merged = merge_lora_files(args.base, args.adapter, args.output, args.hf_output, lora_config, model_config,
                                  progress=not args.no_progress, overwrite=args.overwrite)
    except (*user_errors(), OSError) as exc:
        report(exc, "merge_lora")
        return 1
    written = " and ".join(p for p in (args.output, args.hf_output) if p)
    print(f"merged adapters into {len(merged)} weights; wrote {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
