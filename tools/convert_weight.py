"""Convert Llama weights between HuggingFace and MindSpore formats, streaming tensor by tensor.

  HuggingFace → MindSpore:
    python tools/convert_weight.py [--model llama] --input_path HF_DIR --output_path OUT.ckpt [--dtype bf16]
  MindSpore → HuggingFace:
    python tools/convert_weight.py [--model llama] --reversed --input_path IN.ckpt --output_path HF_DIR \\
        [--config RUN.yaml | --hf_config config.json] [--tokenizer_dir DIR] [--max_shard_size 5GB]

The forward conversion also writes OUT.config.json (the model's config.json) beside OUT.ckpt, so
the checkpoint carries its model: training, predict, merge and the reverse conversion read it
for every setting the YAML leaves out.

Command line compatible with MindFormers' convert_weight.py. Peak memory stays near one 16 MiB
block whatever the model size; outputs appear only when complete.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mindsft.cli import HelpFormatter  # noqa: E402
from mindsft.errors import MindsftError, report, user_errors  # noqa: E402
from mindsft.models.families import FAMILIES  # noqa: E402

MODELS = tuple(dict.fromkeys(name for family in FAMILIES.values() for name in (family.name,) + family.mindformers_names))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--model", default=None,
                        help=f"model family: {', '.join(MODELS)} (default: read from config.json)")
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
    parser.add_argument("--overwrite", action="store_true",
                        help="with --reversed: replace an existing output folder that holds a previous "
                             "conversion (a folder holding anything else is never replaced)")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.model is not None and args.model.lower() not in MODELS:
        parser.error(f"--model {args.model!r} is not supported (choose from {', '.join(MODELS)})")
    from mindsft.weights import find_model_config
    if args.reversed and not (args.config or args.hf_config or find_model_config(args.input_path)):
        parser.error("--reversed needs the model's config: --config RUN.yaml, --hf_config config.json, or the "
                     "X.config.json that the forward conversion writes beside X.ckpt")
    if args.config and args.hf_config:
        parser.error("give --config or --hf_config, not both")
    return args


def hf_config_path(input_path):
    from mindsft.convert.hf_reader import find_weights
    return find_weights(input_path)[1]


def reverse_model_config(args):
    """The model config of the reverse conversion: --config's (over the checkpoint's own), --hf_config's,
    or the one that travels with the checkpoint."""
    from mindsft import convert
    from mindsft.config import load_run_config
    from mindsft.weights import find_model_config
    if args.config:
        return load_run_config(args.config, {"load_checkpoint": args.input_path}).model_config
    path = args.hf_config or find_model_config(args.input_path)
    if path is None:
        raise MindsftError(f"{args.input_path}: no {convert.model_config_path(args.input_path)} beside it; give the "
                           "model's config with --config RUN.yaml or --hf_config config.json")
    return convert.read_model_config(path)


def check_family(model, model_config, source):
    from mindsft.models.families import family_named
    if model is not None and family_named(model).name != model_config.family:
        raise MindsftError(f"{source}: --model {model} but the config describes a {model_config.family} model")


def main(argv=None):
    args = parse_args(argv)
    from mindsft import convert
    try:
        if args.reversed:
            model_config = reverse_model_config(args)
            check_family(args.model, model_config, args.config or args.hf_config or args.input_path)
            summary = convert.ms_to_hf(args.input_path, args.output_path, model_config, dtype=args.dtype,
                                       max_shard_size=args.max_shard_size, tokenizer_dir=args.tokenizer_dir,
                                       progress=not args.no_progress, overwrite=args.overwrite)
        else:
            if args.model is not None:
                check_family(args.model, convert.read_model_config(hf_config_path(args.input_path)), args.input_path)
            summary = convert.hf_to_ms(args.input_path, args.output_path, dtype=args.dtype,
                                       progress=not args.no_progress,
                                       config_path=convert.model_config_path(args.output_path))
    except user_errors() as e:
        report(e)
        return 1
    print(convert.format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
