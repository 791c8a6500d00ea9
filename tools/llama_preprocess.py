"""Tokenize instruction data (qa) or WikiText (wiki) into MindRecord shards for Llama training."""
import argparse
import os
import sys

from mindsft.cli import HelpFormatter
from mindsft.data.mixing import MIX_STRATEGIES, read_manifest
from mindsft.data.preprocess import PreprocessOptions, preprocess, stats_path
from mindsft.errors import report, user_errors
from mindsft.templates import TEMPLATE_NAMES


def build_parser():
    parser = argparse.ArgumentParser(
        formatter_class=HelpFormatter,
        description="Write MindRecord shards of seq_length+1 tokens (MindFormers' llama_preprocess format). "
                    "qa: conversations (alpaca_converter output, ShareGPT, OpenAI messages; JSON array or JSON "
                    "Lines) rendered with a prompt template; columns input_ids and labels (-100 where not "
                    "learned). wiki: WikiText paragraphs concatenated and cut; column input_ids. A stats JSON "
                    "is written beside the output as <output_file>.stats.json.")
    parser.add_argument("--dataset_type", default="qa", choices=["qa", "wiki", "pairwise"],
                        help="qa (conversations), wiki (WikiText) or pairwise (preference pairs: chosen and "
                             "rejected replies to one prompt; qa input whose records have 'chosen' and "
                             "'rejected' is taken as pairwise)")
    parser.add_argument("--input_glob", nargs="+",
                        help="input file or glob (quote it), files read in sorted order; several: one mix "
                             "source each")
    parser.add_argument("--mix_weights", nargs="+", type=float,
                        help="qa: one weight per --input_glob source (scaled to sum to 1), for the "
                             "interleave strategies")
    parser.add_argument("--mix_strategy", default="concat", choices=MIX_STRATEGIES,
                        help="concat: sources in turn; interleave_under/over: draw sources with the weights "
                             "until the first/every source is exhausted (datasets.interleave_datasets)")
    parser.add_argument("--mix_manifest",
                        help="YAML/JSON list of sources {path, weight, max_samples} (or {sources: [...], "
                             "mix_strategy: ...}) instead of --input_glob")
    parser.add_argument("--max_samples", type=int, help="qa: take at most the first N records of each source")
    parser.add_argument("--seed", type=int, default=42, help="seed of the interleaving and the validation split")
    parser.add_argument("--val_size", type=float, default=0,
                        help="qa: records set aside for evaluation before tokenizing: a fraction (< 1) or a "
                             "count (> 1); they go to --eval_output_file")
    parser.add_argument("--eval_output_file",
                        help="where the --val_size records go (default: an eval/ folder beside --output_file)")
    parser.add_argument("--model_file",
                        help="the tokenizer: a tokenizer.model (SentencePiece, or Llama 3's tiktoken file), a "
                             "HuggingFace tokenizer.json or a HuggingFace model folder (default: none; this or "
                             "--vocab_file is required)")
    parser.add_argument("--vocab_file", help="Qwen2's vocab.json (qwen2_preprocess.py's flag), with --merges_file")
    parser.add_argument("--merges_file", help="Qwen2's merges.txt, with --vocab_file")
    parser.add_argument("--seq_length", type=int, default=2048, help="records are seq_length+1 tokens")
    parser.add_argument("--output_file", required=True,
                        help="output path, e.g. out/alpaca.mindrecord; with --file_partition N the shards "
                             "are <output_file>0..N-1")
    parser.add_argument("--file_partition", type=int, default=1, help="number of shards")
    parser.add_argument("--repeat", type=int, default=1, help="write the data this many times")
    parser.add_argument("--num_workers", type=int, default=1,
                        help="tokenizer processes (a tokenizer.json uses its library's threads instead); "
                             "the output bytes do not depend on it")
    parser.add_argument("--template", choices=TEMPLATE_NAMES,
                        help="qa prompt template: vicuna_v1.1 is MindFormers' and FastChat's; hf with "
                             "--vocab_file renders the tokenizer's ChatML, as qwen2_preprocess.py does "
                             "(default: vicuna_v1.1; hf with --vocab_file)")
    parser.add_argument("--tokenizer_config", default=None,
                        help="tokenizer_config.json whose chat_template --template hf uses (default: the one "
                             "beside the tokenizer.json)")
    parser.add_argument("--on_error", default="raise", choices=["raise", "skip"],
                        help="on a malformed record: stop (raise) or count it and go on (skip)")
    parser.add_argument("--drop_overlong", action="store_true",
                        help="drop conversations longer than seq_length+1 instead of truncating them")
    parser.add_argument("--packing", action="store_true",
                        help="qa: pack whole samples into rows of seq_length+1 (first-fit decreasing) with their "
                             "boundaries in an actual_seq_len column; the trainer keeps samples apart")
    parser.add_argument("--target_ids", action="store_true",
                        help="qa: write MindFormers' Qwen2 columns (qwen2_preprocess.py's): input_ids, target_ids "
                             "(= input_ids: every token learned) and attention_mask (0 on padding), not labels")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.input_glob and not args.mix_manifest:
        parser.error("give --input_glob (one or more globs) or --mix_manifest")
    if args.input_glob and args.mix_manifest:
        parser.error("give --input_glob or --mix_manifest, not both")
    if bool(args.vocab_file) != bool(args.merges_file):
        parser.error("--vocab_file and --merges_file go together (Qwen2's vocab.json and merges.txt)")
    if bool(args.model_file) == bool(args.vocab_file):
        parser.error("give the tokenizer once: --model_file, or --vocab_file with --merges_file")
    template = args.template or ("hf" if args.vocab_file else "vicuna_v1.1")
    try:
        sources, strategy = read_manifest(args.mix_manifest) if args.mix_manifest else (None, None)
    except user_errors() as err:
        report(err)
        return 1
    options = PreprocessOptions(
        input_glob=args.input_glob if args.input_glob is None or len(args.input_glob) > 1 else args.input_glob[0],
        sources=sources, mix_weights=args.mix_weights, mix_strategy=strategy or args.mix_strategy,
        max_samples=args.max_samples, seed=args.seed, val_size=args.val_size,
        eval_output_file=args.eval_output_file, model_file=args.model_file or args.vocab_file,
        merges_file=args.merges_file, output_file=args.output_file,
        dataset_type=args.dataset_type, seq_length=args.seq_length, file_partition=args.file_partition,
        repeat=args.repeat, num_workers=args.num_workers, template=template,
        tokenizer_config=args.tokenizer_config, on_error=args.on_error, drop_overlong=args.drop_overlong,
        packing=args.packing, target_ids=args.target_ids,
        progress=not args.no_progress, command_line=[sys.executable] + sys.argv if argv is None else argv)
    try:
        stats = preprocess(options)
    except user_errors() as err:
        report(err)
        return 1
    if stats["dataset_type"] != args.dataset_type:
        print(f"records have 'chosen' and 'rejected': preprocessed as --dataset_type {stats['dataset_type']}")
    if stats.get("packing"):
        print(f"Packed {stats['samples_packed']} samples into {stats['rows']} rows ({stats['samples_per_row']['mean']} "
              f"per row, packing efficiency {stats['packing_efficiency']:.1%})")
    print(f"Wrote {stats['records_written']} records of {stats['record_length']} tokens to "
          f"{', '.join(stats['output_files'])} (read {stats['records_read']}, truncated {stats['truncated']}, "
          f"dropped {stats['dropped']}, skipped {stats['skipped']}); stats in {stats_path(args.output_file)}")
    for source in stats.get("sources", []) if len(stats.get("sources", [])) > 1 else []:
        print(f"  {source['input_glob']}: read {source['records_read']}, taken {source['records_taken']}, "
              f"written {source['records_written']}")
    if stats.get("eval_dataset_dir"):
        print(f"eval records: {os.path.join(os.path.dirname(args.output_file), stats['eval_dataset_dir'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
