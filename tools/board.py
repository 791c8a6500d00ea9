"""The web board: prepare data, train, watch, evaluate, chat and export from a browser page.

    python tools/board.py [--host 127.0.0.1] [--port 7860] [--runs_dir board_runs]

Each button runs the command line the page shows (tools/llama_preprocess.py, run_mindformer.py,
scripts/msrun_launcher.sh, tools/merge_lora.py, tools/convert_weight.py) as a separate process:
training runs go on when the page or the board is closed, and a board started again finds them
in runs_dir. Needs the `board` extra (pip install -e ".[board]"). Stops cleanly on SIGTERM.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mindsft.cli import HelpFormatter  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 opens it to the network)")
    parser.add_argument("--port", type=int, default=7860, help="port to listen on")
    parser.add_argument("--runs_dir", default="board_runs",
                        help="where new training runs go by default and where the board looks for them")
    args = parser.parse_args(argv)
    try:
        from mindsft.board.server import serve
    except ImportError as exc:
        if not exc.name or exc.name.startswith("mindsft"):
            raise
        print(f"board.py: error: {exc.name} is not installed; install the board extra: pip install -e \".[board]\"",
              file=sys.stderr)
        return 2
    serve(args.host, args.port, args.runs_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
