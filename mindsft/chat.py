"""Chat in the terminal with a loaded model: multi-turn in its template, each reply printed as it
is generated. `/clear` starts a new conversation, `/exit` (or end of input) quits."""
import sys

CLEAR_COMMANDS = ("/clear",)
EXIT_COMMANDS = ("/exit", "/quit")
USER_PROMPT = "User: "
ASSISTANT_PROMPT = "Assistant: "


def chat_banner(session):
    return (f"mindsft chat with {session.model_name} (template {session.template.name}, context "
            f"{session.context_length} tokens). Type a message; /clear starts over, /exit quits.")


def run_chat(session, system=None, config=None, adapter=None, stdin=None, stdout=None):
    """The read-reply loop until /exit or end of input; returns the conversation's last history."""
    from mindsft.session import RequestError, drop_oldest_turns
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
