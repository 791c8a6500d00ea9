"""Serve a model behind an OpenAI-compatible API: GET /v1/models, POST /v1/chat/completions and
POST /v1/completions, streamed (server-sent events) or whole. Requests that arrive together
decode together. Point any OpenAI client at http://HOST:PORT/v1.

    python tools/serve.py --config configs/llama2/finetune_llama_tiny_cpu.yaml \\
        --load_checkpoint output/checkpoint/llama_tiny_final.ckpt --vocab_file TOKENIZER_DIR \\
        [--adapter support=ADAPTER_DIR] [--port 8000] [--api_key KEY]

Needs the serve extra: pip install -e .[serve]
"""
import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mindsft.cli import HelpFormatter  # noqa: E402
from mindsft.errors import ConfigError, report, user_errors  # noqa: E402
from mindsft.session import MODEL_FLAGS_EPILOG, add_model_arguments, run_config_from_arguments  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, epilog=MODEL_FLAGS_EPILOG, formatter_class=HelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on")
    parser.add_argument("--api_key", default=os.environ.get("MINDSFT_API_KEY"),
                        help="bearer token every request must send (default: $MINDSFT_API_KEY, else none)")
    parser.add_argument("--log_level", default="info", help="uvicorn's log level")
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    try:
        try:
            import fastapi  # noqa: F401
            import sse_starlette  # noqa: F401
            import uvicorn  # noqa: F401
        except ImportError as err:
            raise ConfigError(f"the server needs {err.name}: pip install -e .[serve]") from None
        from mindsft.server import serve
        from mindsft.session import load_session, parse_adapters
        config = run_config_from_arguments(parser, args, rest)
        session = load_session(config, parse_adapters(args.adapter), args.model_name, max_batch=args.max_batch)
        print(f"serving {', '.join(session.model_names)} on http://{args.host}:{args.port}/v1", flush=True)
        serve(session, args.host, args.port, args.api_key, args.log_level)
    except user_errors() as exc:
        report(exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
