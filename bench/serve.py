"""Serving throughput: 8 requests one after another vs 8 clients at once against tools/serve.py
(a real server process, spoken to with the openai client, greedy, streamed), on a random Llama.

    python bench/serve.py [--hidden 256 --layers 4 --clients 8 --max_tokens 48]

Prints the aggregate tokens/s (all generated tokens over the wall time from the first request
to the last reply) and the time to first token (the first streamed text) at each load, and the
ratio, each load's best of --rounds rounds taken in turns. Every shape is compiled in warm-up
rounds of both loads first. The server decodes as
many rows as the next power of two that holds its requests (up to --max_batch, default the
client count), so a request alone decodes as one row.
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

os.environ.setdefault("GLOG_v", "3")

from bench._common import ROOT, bench_env  # noqa: E402

QUESTIONS = ["What is the capital of France?", "Give three tips for staying healthy.",
             "Write a short poem about the sea.", "Name a colour.", "How do birds fly?",
             "Describe a cat in one sentence.", "What is 2+2?", "Tell me a story about a dragon and a knight."]


def free_port():
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ask(client, question, max_tokens):
    """(generated tokens, seconds to the first text, seconds to the end) of one streamed request."""
    start = time.perf_counter()
    first, tokens = None, 0
    stream = client.chat.completions.create(model="mindsft", messages=[{"role": "user", "content": question}],
                                            temperature=0, max_tokens=max_tokens, stream=True,
                                            stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - start
    return tokens, first if first is not None else time.perf_counter() - start, time.perf_counter() - start


def sequential(client, questions, max_tokens):
    start = time.perf_counter()
    results = [ask(client, q, max_tokens) for q in questions]
    return results, time.perf_counter() - start


def concurrent(client, questions, max_tokens):
    results = [None] * len(questions)

    def run(index):
        results[index] = ask(client, questions[index], max_tokens)
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(questions))]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results, time.perf_counter() - start


def report(label, results, seconds):
    tokens = sum(r[0] for r in results)
    ttft = [r[1] * 1000 for r in results]
    rate = tokens / seconds
    print(f"{label}: {tokens} tokens in {seconds:.2f} s = {rate:.1f} tokens/s aggregate; time to first token "
          f"mean {statistics.mean(ttft):.0f} ms, max {max(ttft):.0f} ms", flush=True)
    return rate


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv_heads", type=int, default=4)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--max_tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds of each load (the best counts)")
    parser.add_argument("--max_batch", type=int, help="rows the server decodes together (default: --clients)")
    args = parser.parse_args()
    import openai
    from mindsft.demo_model import write_tiny_hf_llama

    questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(args.clients)]
    with tempfile.TemporaryDirectory() as work:
        model_dir = Path(work) / "hf"
        write_tiny_hf_llama(model_dir, seed=3, hidden_size=args.hidden, num_layers=args.layers,
                            num_heads=args.heads, n_kv_heads=args.kv_heads, intermediate_size=args.hidden * 8 // 3)
        port = free_port()
        log_path = Path(work) / "server.log"
        command = [sys.executable, str(ROOT / "tools" / "serve.py"), "--config",
                   str(ROOT / "configs" / "llama2" / "finetune_llama_tiny_cpu.yaml"), "--load_checkpoint",
                   str(model_dir), "--template", "vicuna_v1.1", "--port", str(port),
                   "--max_batch", str(args.max_batch or args.clients), "--log_level", "warning",
                   # The tiny YAML's model shape gives way to the benchmark's.
                   "--model.model_config.hidden_size", str(args.hidden), "--model.model_config.num_layers",
                   str(args.layers), "--model.model_config.num_heads", str(args.heads),
                   "--model.model_config.n_kv_heads", str(args.kv_heads),
                   "--model.model_config.intermediate_size", str(args.hidden * 8 // 3)]
        with open(log_path, "w") as log:
            server = subprocess.Popen(command, cwd=ROOT, env=bench_env(), stdout=log, stderr=subprocess.STDOUT)
        try:
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0,
                                   timeout=600)
            deadline = time.time() + 300
            while True:
                if server.poll() is not None:
                    sys.exit("the server stopped:\n" + log_path.read_text()[-3000:])
                try:
                    client.models.list()
                    break
                except openai.APIConnectionError:
                    if time.time() > deadline:
                        sys.exit("the server did not start")
                    time.sleep(0.5)
            print(f"model: hidden {args.hidden}, {args.layers} layers, {args.heads} heads ({args.kv_heads} kv); "
                  f"{args.clients} requests of up to {args.max_tokens} new tokens, greedy, streamed", flush=True)
            sequential(client, questions, args.max_tokens)     # warm-up: every shape compiles
            for _ in range(2):
                concurrent(client, questions, args.max_tokens)
            # The loads take turns and each keeps its best round: the shared machine's speed drifts.
            rounds = {"sequential": [], "concurrent": []}
            for _ in range(args.rounds):
                rounds["sequential"].append(sequential(client, questions, args.max_tokens))
                rounds["concurrent"].append(concurrent(client, questions, args.max_tokens))
            best = {load: min(runs, key=lambda run: run[1]) for load, runs in rounds.items()}
            one = report(f"{args.clients} sequential requests", *best["sequential"])
            many = report(f"{args.clients} concurrent clients", *best["concurrent"])
            print(f"concurrent / sequential aggregate tokens/s: {many / one:.2f}x (best of {args.rounds} rounds each)",
                  flush=True)
        finally:
            server.terminate()
            server.wait(60)


if __name__ == "__main__":
    main()
