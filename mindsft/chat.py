"""Chat in the terminal with a loaded model: multi-turn in its template, each reply printed as it
is generated. `/clear` starts a new conversation, `/exit` (or end of input) quits."""
import argparse
import sys

from mindsft.cli import HelpFormatter
from mindsft.errors import report, user_errors

DESCRIPTION = """Chat with a model in the terminal: multi-turn in its template, replies printed as they are
generated. Type /clear to start a new conversation and /exit (or Ctrl-D) to quit.

    python tools/chat.py --config configs/llama2/finetune_llama_tiny_cpu.yaml \\
        --load_checkpoint output/checkpoint/llama_tiny_final.ckpt --vocab_file TOKENIZER_DIR
"""

CLEAR_COMMANDS = ("/clear",)
EXIT_COMMANDS = ("/exit", "/quit")
USER_PROMPT = "User: "
ASSISTANT_PROMPT = "Assistant: "


def chat_banner(session):
    return (f"mindsft chat with {session.model_name} (template {session.template.name}, context "
            f"{session.context_length} tokens). Type a message; /clear starts over, /exit quits.")


def run_chat(session, system=None, config=None, adapter=None, stdin=None, stdout=None):
    """The read-reply loop until /exit or end of input; returns the conversation's last history."""
    from mindsft.session import RequestError, drop_oldest_turns  # deferred: MindSpore
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    config = config or session.generation_config
    # A reply gets at least this many tokens of the context: older turns go to make room.
    reserve = min(config.new_token_budget(0), session.context_length // 2)
    history = []
    stdout.write(chat_banner(session) + "\n")
    while True:
        stdout.write(USER_PROMPT)
        stdout.flush()
        line = stdin.readline()
        if not line:
            stdout.write("\n")
            return history
        text = line.rstrip("\r\n")
        command = text.strip().lower()
        if command in EXIT_COMMANDS:
            return history
        if command in CLEAR_COMMANDS:
            history = []
            stdout.write("(history cleared)\n")
            continue
        if not text.strip():
            continue
        messages = history + [{"role": "user", "content": text}]
        prompt, kept, dropped = drop_oldest_turns(session, messages, system, reserve)
        if dropped:
            stdout.write(f"(the conversation is longer than the model's {session.context_length} tokens: "
                         f"dropped the oldest {dropped} turn{'s' if dropped > 1 else ''})\n")
        try:
            budget = session.token_budget(prompt, config)
        except RequestError as err:
            stdout.write(f"(cannot answer: {err})\n")
            history = kept[:-1]
            continue
        stdout.write(ASSISTANT_PROMPT)
        stdout.flush()
        reply = []
        for piece in session.stream(prompt, config, adapter=adapter, max_new_tokens=budget):
            reply.append(piece)
            stdout.write(piece)
            stdout.flush()
        stdout.write("\n")
        history = kept + [{"role": "assistant", "content": "".join(reply)}]


def main(argv=None):
    """tools/chat.py and run_mindformer.py --run_mode chat."""
    from mindsft.session import MODEL_FLAGS_EPILOG, add_model_arguments, run_config_from_arguments  # deferred: MindSpore
    parser = argparse.ArgumentParser(description=DESCRIPTION, epilog=MODEL_FLAGS_EPILOG, formatter_class=HelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--system", help="system prompt of every conversation")
    parser.add_argument("--chat_model", help="the adapter to talk to (an --adapter NAME; default: the base)")
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    session = None
    try:
        from mindsft.session import load_session, parse_adapters  # deferred: MindSpore
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
