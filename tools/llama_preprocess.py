"""Tokenize instruction data (qa) or WikiText (wiki) into MindRecord shards for Llama training."""
import argparse
import sys

from mindsft.data.preprocess import PreprocessOptions, preprocess, stats_path
from mindsft.errors import report, user_errors
from mindsft.templates import TEMPLATE_NAMES


def build_parser():
    parser = argparse.ArgumentParser(
        description="Write MindRecord shards of seq_length+1 tokens (MindFormers' llama_preprocess format). "
                    "qa: conversations (alpaca_converter output, ShareGPT, OpenAI messages; JSON array or JSON "
                    "Lines) rendered with a prompt template; columns input_ids and labels (-100 where not "
                    "learned). wiki: WikiText paragraphs concatenated and cut; column input_ids. A stats JSON "
                    "is written beside the output as <output_file>.stats.json.")
    parser.add_argument("--dataset_type", default="qa", choices=["qa", "wiki"], help="qa (default) or wiki")
    parser.add_argument("--input_glob", required=True, help="input file or glob (quote it), files read in sorted order")
    parser.add_argument("--model_file", required=True, help="the Llama SentencePiece tokenizer.model")
    parser.add_argument("--seq_length", type=int, default=2048, help="records are seq_length+1 tokens (default 2048)")
    parser.add_argument("--output_file", required=True,
                        help="output path, e.g. out/alpaca.mindrecord; with --file_partition N the shards "
                             "are <output_file>0..N-1")
    parser.add_argument("--file_partition", type=int, default=1, help="number of shards (default 1)")
    parser.add_argument("--repeat", type=int, default=1, help="write the data this many times (default 1)")
    parser.add_argument("--num_workers", type=int, default=1,
                        help="tokenizer processes; the output bytes do not depend on it (default 1)")
    parser.add_argument("--template", default="vicuna_v1.1", choices=TEMPLATE_NAMES,
                        help="qa prompt template (default vicuna_v1.1, MindFormers' and FastChat's)")
    parser.add_argument("--tokenizer_config", default=None,
                        help="tokenizer_config.json whose chat_template --template hf uses")
    parser.add_argument("--on_error", default="raise", choices=["raise", "skip"],
                        help="on a malformed record: stop (raise, default) or count it and go on (skip)")
    parser.add_argument("--drop_overlong", action="store_true",
                        help="drop conversations longer than seq_length+1 instead of truncating them")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    options = PreprocessOptions(
        input_glob=args.input_glob, model_file=args.model_file, output_file=args.output_file,
        dataset_type=args.dataset_type, seq_length=args.seq_length, file_partition=args.file_partition,
        repeat=args.repeat, num_workers=args.num_workers, template=args.template,
        tokenizer_config=args.tokenizer_config, on_error=args.on_error, drop_overlong=args.drop_overlong,
        progress=not args.no_progress, command_line=[sys.executable] + sys.argv if argv is None else argv)
    try:
        stats = preprocess(options)
    except user_errors() as err:
        report(err)
        return 1
    print(f"Wrote {stats['records_written']} records of {stats['record_length']} tokens to "
          f"{', '.join(stats['output_files'])} (read {stats['records_read']}, truncated {stats['truncated']}, "
          f"dropped {stats['dropped']}, skipped {stats['skipped']}); stats in {stats_path(args.output_file)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
