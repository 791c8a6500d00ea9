"""Text generation with a key/value cache: prefill the prompts, then one compiled step per token.

Greedy or sampled (temperature, top_k, top_p), repetition penalty, stop at EOS or any stop id.
Prompts of different lengths share one batch by left padding; each row computes what it would
alone. Settings use HuggingFace's `generation_config.json` key names.
"""
import dataclasses
import time
from typing import List, Sequence

import mindspore as ms
import numpy as np
from mindspore import Tensor, ops

from mindsft.errors import ConfigError
from mindsft.generation_config import GenerationConfig  # noqa: F401 - what generate() takes

@dataclasses.dataclass
class GenerationOutput:
    """New tokens per prompt (a stop token that ended a row is kept, as transformers keeps it)."""
    sequences: List[List[int]]
    stopped: List[bool]
    prefill_tokens: int
    prefill_seconds: float
    decode_tokens: int
    decode_seconds: float

    @property
    def prefill_tokens_per_second(self):
        return self.prefill_tokens / self.prefill_seconds if self.prefill_seconds > 0 else 0.0

    @property
    def decode_tokens_per_second(self):
        return self.decode_tokens / self.decode_seconds if self.decode_seconds > 0 else 0.0


def apply_repetition_penalty(logits, seen, penalty):
    """CTRL's penalty, as transformers applies it: seen tokens' logits divided (if > 0) or
    multiplied (if < 0) by `penalty`. seen [B, vocab] bool."""
    penalized = np.where(logits < 0, logits * penalty, logits / penalty)
    return np.where(seen, penalized, logits).astype(np.float32)


def filter_top_k(logits, top_k):
    """Keep the top_k largest logits per row (ties with the k-th kept, as transformers does)."""
    if top_k <= 0 or top_k >= logits.shape[-1]:
        return logits
    kth = -np.partition(-logits, top_k - 1, axis=-1)[:, top_k - 1:top_k]
    return np.where(logits < kth, -np.inf, logits).astype(np.float32)


def filter_top_p(logits, top_p):
    """Nucleus filter as transformers does it: drop the smallest tokens whose total probability
    stays within 1 - top_p, always keeping the most likely one."""
    if top_p >= 1.0:
        return logits
    order = np.argsort(logits, axis=-1, kind="stable")
    ascending = np.take_along_axis(logits, order, -1)
    probs = softmax(ascending)
    remove_sorted = np.cumsum(probs, -1) <= (1 - top_p)
    remove_sorted[:, -1] = False
    remove = np.zeros_like(remove_sorted)
    np.put_along_axis(remove, order, remove_sorted, -1)
    return np.where(remove, -np.inf, logits).astype(np.float32)


def softmax(logits):
    shifted = logits - logits.max(-1, keepdims=True)
    exp = np.exp(shifted.astype(np.float64))
    return exp / exp.sum(-1, keepdims=True)


class TokenChooser:
    """Turns each step's logits into the next token of every row (greedy or sampled)."""

    def __init__(self, config, batch, vocab_size, prompts):
        self.config = config
        self.rng = np.random.default_rng(config.seed)
        self.penalty = float(config.repetition_penalty)
        self.seen = None
        if self.penalty != 1.0:
            self.seen = np.zeros((batch, vocab_size), bool)
            for row, prompt in enumerate(prompts):
                self.seen[row, [t for t in prompt if 0 <= t < vocab_size]] = True

    def __call__(self, logits):
        if self.seen is not None:
            logits = apply_repetition_penalty(logits, self.seen, self.penalty)
        if not self.config.do_sample:
            return logits.argmax(-1).astype(np.int32)
        logits = logits / np.float32(self.config.temperature)
        logits = filter_top_k(logits, int(self.config.top_k))
        logits = filter_top_p(logits, float(self.config.top_p))
        cumulative = np.cumsum(softmax(logits), -1)
        draws = self.rng.random(logits.shape[0]) * cumulative[:, -1]
        chosen = [min(int(np.searchsorted(row, u, side="right")), logits.shape[-1] - 1)
                  for row, u in zip(cumulative, draws)]
        return np.asarray(chosen, np.int32)

    def record(self, tokens, active):
        if self.seen is not None:
            rows = np.nonzero(active)[0]
            self.seen[rows, tokens[rows]] = True


def left_pad(prompts, pad_id, bucket):
    """Prompts left-padded to a common length rounded up to `bucket` (fewer distinct shapes, so
    fewer compilations); returns ids [B, P], mask [B, P] and positions [B, P] (int32)."""
    longest = max(len(p) for p in prompts)
    length = -(-longest // bucket) * bucket if bucket > 1 else longest
    ids = np.full((len(prompts), length), pad_id, np.int32)
    mask = np.zeros((len(prompts), length), np.int32)
    for row, prompt in enumerate(prompts):
        if prompt:
            ids[row, length - len(prompt):] = prompt
            mask[row, length - len(prompt):] = 1
    positions = np.clip(np.cumsum(mask, 1) - 1, 0, None).astype(np.int32)
    return ids, mask, positions


class Generator:
    """Generation for one model; holds the compiled prefill/decode functions so that repeated
    calls with the same shapes do not compile again."""

    def __init__(self, model, prompt_bucket=16):
        self.model = model
        self.prompt_bucket = prompt_bucket

        # Caches are passed unpacked: a tuple argument makes ms.jit compile on every call.
        def cached_forward(input_ids, position_ids, cache_mask, query_slots, *caches):
            return model.forward_cached(input_ids, position_ids, cache_mask, query_slots, caches)

        def full_forward(input_ids, attention_mask, last_index):
            hidden = model.model(input_ids, attention_mask)
            return model.logits_from_hidden(ops.gather(hidden, last_index, 1))[:, 0]

        self.cached_forward = ms.jit(cached_forward)
        self.full_forward = ms.jit(full_forward)

    def generate(self, prompts: Sequence[Sequence[int]], config: GenerationConfig = None,
                 on_step=None, use_cache=None) -> GenerationOutput:
        """Generate for a batch of token-id prompts. `on_step(tokens, active)` is called after
        every step with the new token of each row and which rows were still generating."""
        config = config or GenerationConfig()
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ConfigError("generate: every prompt needs at least one token")
        use_cache = config.use_cache if use_cache is None else use_cache
        model_config = self.model.config
        pad_id = model_config.pad_token_id if config.pad_token_id is None else config.pad_token_id
        stop_ids = np.array(sorted(config.stop_ids(model_config)), np.int32)
        batch = len(prompts)
        ids, mask, positions = left_pad(prompts, pad_id, self.prompt_bucket)
        prompt_length = ids.shape[1]
        new_tokens = config.new_token_budget(max(len(p) for p in prompts))
        total = prompt_length + new_tokens
        chooser = TokenChooser(config, batch, model_config.vocab_size, prompts)
        step_fn = self._cached_steps if use_cache else self._full_steps
        steps = step_fn(ids, mask, positions, total)

        sequences = [[] for _ in range(batch)]
        active = np.ones(batch, bool)
        real_lengths = mask.sum(1)
        start = time.perf_counter()
        logits = next(steps)
        prefill_seconds = time.perf_counter() - start
        decode_seconds, decode_tokens = 0.0, 0
        for step in range(new_tokens):
            start = time.perf_counter()
            if step > 0:
                logits = steps.send((tokens, real_lengths + step - 1))
            tokens = chooser(logits)
            tokens = np.where(active, tokens, pad_id).astype(np.int32)
            for row in np.nonzero(active)[0]:
                sequences[row].append(int(tokens[row]))
            chooser.record(tokens, active)
            if step > 0:
                decode_seconds += time.perf_counter() - start
                decode_tokens += int(active.sum())
            if on_step is not None:
                on_step(tokens, active.copy())
            active &= ~np.isin(tokens, stop_ids)
            if not active.any():
                break
        steps.close()
        stopped = [bool(seq) and seq[-1] in set(stop_ids.tolist()) for seq in sequences]
        return GenerationOutput(sequences, stopped, int(real_lengths.sum()), prefill_seconds,
                                decode_tokens, decode_seconds)

    def _cached_steps(self, ids, mask, positions, total):
        """Prefill, then yield logits [B, vocab] per step; receives (tokens, their positions)."""
        batch, prompt_length = ids.shape
        cache_mask = np.zeros((batch, total), np.int32)
        cache_mask[:, :prompt_length] = mask
        caches = self.model.empty_caches(batch, total)
        logits, caches = self.cached_forward(Tensor(ids), Tensor(positions), Tensor(cache_mask),
                                             Tensor(np.arange(prompt_length, dtype=np.int32)), *caches)
        slot = prompt_length
        while True:
            tokens, token_positions = yield logits.asnumpy()
            cache_mask[:, slot] = 1
            logits, caches = self.cached_forward(
                Tensor(tokens.reshape(batch, 1)), Tensor(token_positions.astype(np.int32).reshape(batch, 1)),
                Tensor(cache_mask), Tensor(np.array([slot], np.int32)), *caches)
            slot += 1

    def _full_steps(self, ids, mask, positions, total):
        """The same steps recomputing the whole sequence each time (the reference for the cache):
        a fixed [B, total] buffer with the future masked, so it also compiles once."""
        batch, prompt_length = ids.shape
        buffer = np.zeros((batch, total), np.int32)
        buffer_mask = np.zeros((batch, total), np.int32)
        buffer[:, :prompt_length], buffer_mask[:, :prompt_length] = ids, mask
        slot = prompt_length
        while True:
            logits = self.full_forward(Tensor(buffer), Tensor(buffer_mask), Tensor(np.array([slot - 1], np.int32)))
            tokens, _ = yield logits.asnumpy()
            buffer[:, slot], buffer_mask[:, slot] = tokens, 1
            slot += 1


def generate(model, prompts, config=None, on_step=None, use_cache=None):
    """Generate for token-id prompts with a one-off `Generator` (keep a Generator to reuse compiled steps)."""
    return Generator(model).generate(prompts, config, on_step=on_step, use_cache=use_cache)
