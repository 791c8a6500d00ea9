"""Chat with a model in the terminal: multi-turn in its template, replies printed as they are
generated. Type /clear to start a new conversation and /exit (or Ctrl-D) to quit.

    python tools/chat.py --config configs/llama2/finetune_llama_tiny_cpu.yaml \\
        --load_checkpoint output/checkpoint/llama_tiny_final.ckpt --vocab_file TOKENIZER_DIR
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mindsft.cli import HelpFormatter  # noqa: E402
from mindsft.errors import report, user_errors  # noqa: E402
from mindsft.session import MODEL_FLAGS_EPILOG, add_model_arguments, run_config_from_arguments  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, epilog=MODEL_FLAGS_EPILOG, formatter_class=HelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--system", help="system prompt of every conversation")
    parser.add_argument("--chat_model", help="the adapter to talk to (an --adapter NAME; default: the base)")
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    session = None
    try:
        from mindsft.chat import run_chat
        from mindsft.session import load_session, parse_adapters
        config = run_config_from_arguments(parser, args, rest)
        session = load_session(config, parse_adapters(args.adapter), args.model_name, max_batch=1)
        adapter = session.adapter_of(args.chat_model) if args.chat_model else None
        run_chat(session, system=args.system, adapter=adapter)
    except user_errors() as exc:
        report(exc)
        return 2
    except KeyboardInterrupt:
        print()
    finally:
        if session is not None:
            session.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
