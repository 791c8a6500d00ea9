"""What a person watches during a run, on rank 0: on a terminal one progress bar (loss, lr, ETA)
and a full log line every `per_print_times` steps; elsewhere (a log file, a pipe, msrun's worker
logs) log lines only, every step unless told otherwise. Also `metrics.jsonl`, TensorBoard
scalars, and a loss curve PNG at the end."""
import json
import math
import os
import struct
import sys
import time

from tqdm import tqdm

from mindsft.output_files import atomic_output, write_text_atomic
from mindsft.protowire import field, parse_fields, varint


def masked_crc32c(data):
    """TFRecord framing checksum: CRC-32C, rotated and offset as TensorFlow does."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    crc ^= 0xFFFFFFFF
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _crc32c_table():
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


CRC32C_TABLE = _crc32c_table()


def scalar_event(tag, value, step, wall_time):
    """A serialized tensorflow Event{wall_time, step, summary{value{tag, simple_value}}}."""
    tag_bytes = tag.encode()
    summary_value = field(1, 2, varint(len(tag_bytes)) + tag_bytes) + field(2, 5, struct.pack("<f", value))
    summary = field(1, 2, varint(len(summary_value)) + summary_value)
    return (field(1, 1, struct.pack("<d", wall_time)) + field(2, 0, varint(step))
            + field(5, 2, varint(len(summary)) + summary))


class TensorBoardWriter:
    """Writes scalars to an `events.out.tfevents.*` file TensorBoard reads (no TensorFlow needed)."""

    def __init__(self, log_dir):
        os.makedirs(log_dir, exist_ok=True)
        self.path = os.path.join(log_dir, f"events.out.tfevents.{int(time.time())}.mindsft")
        self.file = open(self.path, "ab")
        self._write(field(1, 1, struct.pack("<d", time.time())) + field(3, 2, varint(13) + b"brain.Event:2"))

    def _write(self, record):
        header = struct.pack("<Q", len(record))
        self.file.write(header + struct.pack("<I", masked_crc32c(header)) + record
                        + struct.pack("<I", masked_crc32c(record)))

    def scalars(self, step, values):
        now = time.time()
        for tag, value in values.items():
            if value is not None and math.isfinite(value):
                self._write(scalar_event(tag, float(value), step, now))
        self.file.flush()

    def close(self):
        self.file.close()


def read_tensorboard_scalars(path):
    """{tag: [(step, value)]} from an events file: the reader used by the tests and the plot."""
    out = {}
    with open(path, "rb") as f:
        data = f.read()
    pos = 0
    while pos < len(data):
        (length,) = struct.unpack_from("<Q", data, pos)
        record = data[pos + 12:pos + 12 + length]
        if struct.unpack_from("<I", data, pos + 12 + length)[0] != masked_crc32c(record):
            raise ValueError(f"{path}: record at byte {pos} fails its checksum")
        pos += 16 + length
        step, tag, value = _parse_event(record)
        if tag is not None:
            out.setdefault(tag, []).append((step, value))
    return out


def _parse_event(record):
    step, tag, value = 0, None, None
    for number, payload in parse_fields(record):
        if number == 2:
            step = payload
        elif number == 5:
            for _, summary_value in parse_fields(payload):
                for inner_number, inner in parse_fields(summary_value):
                    if inner_number == 1:
                        tag = inner.decode()
                    elif inner_number == 2:
                        value = struct.unpack("<f", inner)[0]
    return step, tag, value


def format_seconds(seconds):
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


# Log lines between bar updates on a terminal when per_print_times is not set: the bar already
# shows every step, so a line each step would scroll the bar away.
TERMINAL_PRINT_EVERY = 10


def is_terminal(stream):
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class TrainingMonitor:
    """Per-step reporting. Only rank 0 prints and writes files; other ranks stay quiet.

    print_every: a log line every N steps (and at the last); None: 1 off a terminal,
    TERMINAL_PRINT_EVERY on one. stream: where the bar and lines go (stdout).
    """

    def __init__(self, output_dir, total_steps, start_step, is_main, print_every=None, resume=False, stream=None):
        self.is_main = is_main
        self.total_steps = total_steps
        self.stream = stream or sys.stdout
        interactive = is_terminal(self.stream)
        if print_every is None:
            print_every = TERMINAL_PRINT_EVERY if interactive else 1
        self.print_every = max(int(print_every), 1)
        self.bar = None
        self.started = None
        self.steps_timed = 0
        self.time_spent = 0.0
        self.metrics_path = os.path.join(output_dir, "metrics.jsonl")
        if not is_main:
            return
        os.makedirs(output_dir, exist_ok=True)
        if not resume:
            with open(self.metrics_path, "w"):
                pass
        else:
            trim_metrics(self.metrics_path, start_step)
        self.tensorboard = TensorBoardWriter(os.path.join(output_dir, "tensorboard"))
        if interactive:
            # tqdm's own time estimate would count the first step's compilation: ours is in the postfix.
            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
                            file=self.stream, bar_format="{desc} {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} "
                                                         "[{elapsed}{postfix}]")

    def write(self, text):
        """A full line on the console, above the bar when there is one."""
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def log_step(self, record, step_seconds, first_step_of_run):
        """Record one optimizer step; `record` has step, epoch, loss, lr, grad_norm, loss_scale, tokens, samples."""
        if not first_step_of_run:
            # The first step of a run compiles the graph: left out of speed and ETA.
            self.steps_timed += 1
            self.time_spent += step_seconds
        mean_step = self.time_spent / self.steps_timed if self.steps_timed else step_seconds
        record = dict(record, step_time_s=round(step_seconds, 4),
                      tokens_per_s=record["tokens"] / step_seconds, samples_per_s=record["samples"] / step_seconds)
        record["eta_s"] = round(mean_step * (self.total_steps - record["step"]), 1)
        if not self.is_main:
            return record
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        # Named metrics beside the loss (a preference stage's "rewards/margins", ...), as TRL names them.
        named = {k: v for k, v in record.items() if "/" in k}
        self.tensorboard.scalars(record["step"], {**{k: record[k] for k in
                                                     ("loss", "lr", "grad_norm", "loss_scale", "tokens_per_s")},
                                                  **named})
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss {record['loss']:.4f}, lr {record['lr']:.2e}, "
                                     f"ETA {format_seconds(record['eta_s'])}", refresh=False)
            self.bar.update(1)
        if record["step"] % self.print_every == 0 or record["step"] == self.total_steps:
            self.write(
                f"step {record['step']}/{self.total_steps} epoch {record['epoch']} loss {record['loss']:.6f} "
                f"lr {record['lr']:.3e} grad_norm {record['grad_norm']:.4f} loss_scale {record['loss_scale']:g} "
                f"tokens/s {record['tokens_per_s']:.0f} samples/s {record['samples_per_s']:.2f} "
                f"step_time {step_seconds * 1000:.0f} ms ETA {format_seconds(record['eta_s'])}"
                + "".join(f" {name} {value:.4f}" for name, value in named.items()))
        return record

    def log_eval(self, step, loss, perplexity, scores=None):
        """Eval loss and perplexity (None for a preference loss), and `scores` of generation
        ({"eval_bleu-4": ...}) or preference metrics if any."""
        if not self.is_main:
            return
        values = {"eval_loss": loss, **({} if perplexity is None else {"eval_perplexity": perplexity}),
                  **(scores or {})}
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        self.tensorboard.scalars(step, values)
        extra = "".join(f" {name[len('eval_'):]} {value:.2f}" for name, value in (scores or {}).items())
        shown = "" if perplexity is None else f" perplexity {perplexity:.4f}"
        self.write(f"eval at step {step}: loss {loss:.6f}{shown}{extra}")

    def close(self):
        if self.is_main:
            if self.bar is not None:
                self.bar.close()
            self.tensorboard.close()


class CompileTally:
    """Per batch shape, the seconds of its steps: the first step of a shape compiles the step's
    graph, so its compile time is its first step less the median of its later ones."""

    def __init__(self):
        self.seconds = {}

    def add(self, shape, seconds):
        self.seconds.setdefault(shape, []).append(seconds)

    def compile_seconds(self):
        total = 0.0
        for times in self.seconds.values():
            later = sorted(times[1:])
            steady = later[len(later) // 2] if later else 0.0
            total += max(times[0] - steady, 0.0)
        return total

    def summary(self):
        """One line: shapes compiled, seconds compiling, and their share of the run's step time."""
        steps = sum(sum(times) for times in self.seconds.values())
        compiling = self.compile_seconds()
        shapes = ", ".join("x".join(str(d) for d in shape) for shape in sorted(self.seconds))
        share = 100.0 * compiling / steps if steps else 0.0
        return (f"the step was compiled for {len(self.seconds)} batch shape(s) [{shapes}]: {compiling:.1f} s "
                f"compiling of {steps:.1f} s in steps ({share:.1f}%)")


def trim_metrics(path, start_step):
    """On resume, drop lines for steps after the checkpoint so metrics.jsonl reads as one run.

    Rewritten through a temporary name: a kill during the rewrite leaves the old file whole. A
    line cut short by a kill during an append is dropped with the steps after the checkpoint.
    """
    if not os.path.isfile(path):
        return
    kept = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and row.get("step", 0) <= start_step:
                kept.append(json.dumps(row) + "\n")
    write_text_atomic(path, "".join(kept))


def read_metrics(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_loss(metrics_path, output_path=None):
    """Loss curve PNG beside metrics.jsonl: the training loss raw and smoothed, as LLaMA-Factory's
    plot_loss draws it, and the eval loss where the run evaluated."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in read_metrics(metrics_path) if "loss" in r]
    if not rows:
        return None
    steps = [r["step"] for r in rows]
    losses = [r["loss"] for r in rows]
    output_path = output_path or os.path.join(os.path.dirname(metrics_path), "training_loss.png")
    smoothed, last = [], losses[0]
    # LLaMA-Factory's smoothing: EMA whose weight grows with the run length.
    weight = 1.8 * (1 / (1 + math.exp(-0.05 * len(losses))) - 0.5)
    for value in losses:
        last = last * weight + (1 - weight) * value
        smoothed.append(last)
    figure = plt.figure()
    plt.plot(steps, losses, color="#1f77b4", alpha=0.4, label="original")
    plt.plot(steps, smoothed, color="#1f77b4", label="smoothed")
    evaluated = [r for r in read_metrics(metrics_path) if "eval_loss" in r]
    if evaluated:
        plt.plot([r["step"] for r in evaluated], [r["eval_loss"] for r in evaluated], color="#ff7f0e",
                 marker="o", label="eval_loss")
    plt.title(f"training loss of {os.path.dirname(os.path.abspath(metrics_path))}")
    plt.xlabel("step")
    plt.ylabel("loss")
    plt.legend()
    with atomic_output(output_path) as tmp:
        plt.savefig(tmp, format="png", dpi=100)
    plt.close(figure)
    return output_path
