"""Train, fine-tune, evaluate or predict with a MindFormers-style YAML config.

    python run_mindformer.py --config configs/llama2/finetune_llama2_7b.yaml \
        --load_checkpoint model.ckpt --train_dataset_dir out/ --run_mode finetune
    bash scripts/msrun_launcher.sh "run_mindformer.py --config ... --use_parallel True" 8

Flags left out keep the YAML's value. Any YAML key can be overridden with a dotted flag
(`--optimizer.learning_rate 1e-5`) or `--options k=v ...`.
"""
import argparse
import sys

from mindsft.cli import YamlOverrideHelpFormatter
from mindsft.config import RUN_MODES, load_run_config
from mindsft.errors import report, user_errors
from mindsft.generation_config import SAMPLING_FLAGS, add_sampling_arguments

# Run modes with command lines of their own (mindsft/chat.py, mindsft/server.py).
TALK_MODES = ("chat", "serve")

# Flag → the YAML key it sets (MindFormers' mapping).
FLAG_KEYS = {
    "run_mode": "run_mode", "load_checkpoint": "load_checkpoint", "output_dir": "output_dir",
    "seed": "seed", "resume_training": "resume_training", "use_parallel": "use_parallel",
    "train_dataset_dir": "train_dataset.data_loader.dataset_dir",
    "eval_dataset_dir": "eval_dataset.data_loader.dataset_dir",
    "epochs": "runner_config.epochs", "batch_size": "runner_config.batch_size",
    "gradient_accumulation_steps": "runner_config.gradient_accumulation_steps",
    "device_target": "context.device_target", "do_eval": "do_eval",
    "predict_data": "predict_data", "template": "template",
    "num_beams": "generation_config.num_beams", **SAMPLING_FLAGS,
    # Accepted as MindFormers takes them; the run says in one line what they change here.
    "register_path": "register_path", "auto_trans_ckpt": "auto_trans_ckpt",
    "src_strategy_path_or_dir": "src_strategy_path_or_dir", "only_save_strategy": "only_save_strategy",
    "remote_save_url": "remote_save_url", "sink_mode": "runner_config.sink_mode", "profile": "profile",
    "mode": "context.mode", "device_id": "context.device_id",
}


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=YamlOverrideHelpFormatter)
    parser.add_argument("--config", required=True, help="run config YAML (MindFormers' schema)")
    parser.add_argument("--run_mode", choices=RUN_MODES + TALK_MODES,
                        help="train | finetune (same loop) | eval | predict | chat | serve (chat and serve take "
                             "tools/chat.py's and tools/serve.py's flags)")
    parser.add_argument("--load_checkpoint", help="weights to start from: a .ckpt, or a folder holding one")
    parser.add_argument("--train_dataset_dir", help="folder of MindRecord files (llama_preprocess output)")
    parser.add_argument("--eval_dataset_dir", help="folder of MindRecord files for eval")
    parser.add_argument("--use_parallel", help="True under msrun: data parallel over the workers")
    parser.add_argument("--output_dir", help="where checkpoints, metrics.jsonl and plots go")
    parser.add_argument("--seed", help="seed of the data order and initialisation")
    parser.add_argument("--resume_training", help="True: continue from the last step every rank saved "
                                                  "(or a checkpoint folder)")
    parser.add_argument("--epochs", help="runner_config.epochs")
    parser.add_argument("--batch_size", help="runner_config.batch_size (per worker, per micro-step)")
    parser.add_argument("--gradient_accumulation_steps", help="micro-steps per optimizer step")
    parser.add_argument("--device_target", help="CPU, GPU or Ascend")
    parser.add_argument("--do_eval", help="True: evaluate every eval_step_interval steps")
    parser.add_argument("--predict_data", help="run_mode predict: a prompt, a .txt (one prompt a line), "
                                               "or a .json/.jsonl of alpaca/ShareGPT records")
    parser.add_argument("--template", help="prompt template for predict (default: the one the training "
                                           "data used; 'raw' for plain completion)")
    add_sampling_arguments(parser)
    parser.add_argument("--num_beams", help="generation_config.num_beams (> 1: beam search; with "
                                            "length_penalty and early_stopping as transformers reads them)")
    parser.add_argument("--register_path", help="MindFormers' research folder (research/llama3_1, research/qwen2_5): "
                                                "accepted, the families are built in")
    parser.add_argument("--auto_trans_ckpt", help="True: MindFormers' checkpoint transformation; a complete "
                                                  "checkpoint needs none, a sharded one is refused")
    parser.add_argument("--src_strategy_path_or_dir", help="the strategy of a sharded load_checkpoint (refused)")
    parser.add_argument("--only_save_strategy", help="accepted, no effect")
    parser.add_argument("--remote_save_url", help="accepted, no effect")
    parser.add_argument("--sink_mode", help="accepted, no effect (the loop feeds step by step)")
    parser.add_argument("--profile", help="accepted, no effect")
    parser.add_argument("--mode", help="context.mode: 0 graph, 1 PyNative")
    parser.add_argument("--device_id", help="context.device_id")
    parser.add_argument("--options", nargs="*", default=[], metavar="KEY=VALUE", help="dotted YAML overrides")
    args, rest = parser.parse_known_args(argv)
    overrides = {FLAG_KEYS[name]: value for name, value in vars(args).items()
                 if name in FLAG_KEYS and value is not None}
    for item in args.options:
        if "=" not in item:
            parser.error(f"--options takes KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        overrides[key] = value
    if len(rest) % 2:
        parser.error(f"dotted overrides come in pairs (--a.b value): {' '.join(rest)}")
    for flag, value in zip(rest[::2], rest[1::2]):
        if not flag.startswith("--"):
            parser.error(f"unexpected argument {flag!r}")
        overrides[flag[2:]] = value
    return args.config, overrides


def talk_mode(argv):
    """`chat` or `serve` when --run_mode asks for one, else None."""
    for flag, value in zip(argv, argv[1:]):
        if flag == "--run_mode" and value in TALK_MODES:
            return value
    return None


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    argv = [part for arg in argv for part in (arg.split("=", 1) if arg.startswith("--run_mode=") else [arg])]
    mode = talk_mode(argv)
    if mode is not None:
        rest = [a for i, a in enumerate(argv) if a != "--run_mode" and (i == 0 or argv[i - 1] != "--run_mode")]
        if mode == "chat":
            from mindsft.chat import main as chat_main
            return chat_main(rest)
        from mindsft.server import main as serve_main
        return serve_main(rest)
    config_path, overrides = parse_args(argv)
    try:
        config = load_run_config(config_path, overrides)
        from mindsft.run import run
        run(config)
    except user_errors() as exc:
        report(exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
