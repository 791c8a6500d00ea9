"""Convert Stanford Alpaca records into the conversation JSON that llama_preprocess.py reads."""
import argparse
import sys

from mindsft.cli import HelpFormatter
from mindsft.data.alpaca import convert_alpaca
from mindsft.errors import report, user_errors


def main(argv=None):
    parser = argparse.ArgumentParser(
        formatter_class=HelpFormatter,
        description="Turn alpaca records ({instruction, input, output}; JSON array or JSON Lines) into "
                    "conversations [{from: human, value: Alpaca prompt}, {from: gpt, value: output}], "
                    "ids '1', '2', ... (MindFormers' alpaca_converter format).")
    parser.add_argument("--data_path", required=True, help="alpaca JSON array or JSON Lines file")
    parser.add_argument("--output_path", required=True,
                        help="conversation JSON to write (indent 2, UTF-8); an existing file is replaced, "
                             "an existing folder is an error")
    args = parser.parse_args(argv)
    try:
        count = convert_alpaca(args.data_path, args.output_path)
    except user_errors() as err:
        report(err)
        return 1
    print(f"Converted {count} records to {args.output_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
