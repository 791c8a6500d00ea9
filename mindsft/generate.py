"""Text generation with a key/value cache: prefill the prompts, then one compiled step per token.

Greedy or sampled (temperature, top_k, top_p), or beam search (num_beams, length_penalty,
early_stopping, as transformers does it); repetition penalty, stop at EOS or any stop id.
Prompts of different lengths share one batch by left padding; each row computes what it would
alone. Settings use HuggingFace's `generation_config.json` key names.
"""
import dataclasses
import time
from typing import List, Optional, Sequence

import mindspore as ms
import numpy as np
from mindspore import Tensor, ops

from mindsft.errors import ConfigError
from mindsft.generation_config import GenerationConfig  # noqa: F401 - what generate() takes
from mindsft.cpu_kernels import beam_top_k

@dataclasses.dataclass
class GenerationOutput:
    """New tokens per prompt (a stop token that ended a row is kept, as transformers keeps it).

    Speed figures leave compilation out: a call that met a shape for the first time compiled it,
    and its time is in compile_seconds, its tokens in no rate. prefill_tokens counts every prompt
    token, timed_prefill_tokens those of calls that compiled nothing; decode_tokens counts the
    tokens of decode steps that compiled nothing (with beam search, every beam's).
    """
    sequences: List[List[int]]
    stopped: List[bool]
    prefill_tokens: int
    prefill_seconds: float
    decode_tokens: int
    decode_seconds: float
    compile_seconds: float = 0.0
    timed_prefill_tokens: Optional[int] = None

    @property
    def prefill_tokens_per_second(self):
        timed = self.prefill_tokens if self.timed_prefill_tokens is None else self.timed_prefill_tokens
        return timed / self.prefill_seconds if self.prefill_seconds > 0 else 0.0

    @property
    def decode_tokens_per_second(self):
        return self.decode_tokens / self.decode_seconds if self.decode_seconds > 0 else 0.0


class SpeedTally:
    """Tokens and seconds of one generate call, by phase; a call whose shape `known_shapes` has
    not seen compiles its graph, so its time counts as compilation (and the shape becomes known)."""

    def __init__(self, known_shapes):
        self.known_shapes = known_shapes
        self.prefill_tokens = self.timed_prefill_tokens = self.decode_tokens = 0
        self.prefill_seconds = self.decode_seconds = self.compile_seconds = 0.0

    def add(self, phase, shape, tokens, seconds):
        if phase == "prefill":
            self.prefill_tokens += tokens
        if shape not in self.known_shapes:
            self.known_shapes.add(shape)
            self.compile_seconds += seconds
        elif phase == "prefill":
            self.timed_prefill_tokens += tokens
            self.prefill_seconds += seconds
        else:
            self.decode_tokens += tokens
            self.decode_seconds += seconds

    def output(self, sequences, stopped):
        return GenerationOutput(sequences, stopped, self.prefill_tokens, self.prefill_seconds, self.decode_tokens,
                                self.decode_seconds, self.compile_seconds, self.timed_prefill_tokens)


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


# transformers' "minus infinity" for beam scores: added, not assigned, exactly as it does, so that
# the same candidates win every comparison (float32 sums with -1e9 tie where transformers' tie).
BEAM_EXCLUDED = np.float32(-1.0e9)


def log_softmax(logits):
    shifted = logits - logits.max(-1, keepdims=True)
    return (shifted - np.log(np.exp(shifted.astype(np.float64)).sum(-1, keepdims=True))).astype(np.float32)


def top_k_descending(scores, k):
    """Indices of the k largest entries per row, best first; among equal entries the lower index
    wins, at the cut too (argpartition alone would keep an arbitrary one of a tie there)."""
    rows, n = scores.shape
    if k >= n:
        return np.lexsort((np.broadcast_to(np.arange(n), scores.shape), -scores), axis=1)
    kth = np.partition(scores, n - k, axis=1)[:, n - k:n - k + 1]
    at_least = scores >= kth
    if (at_least.sum(1) == k).all():  # no tie at the cut: the usual case, one vectorized pass
        candidates = np.nonzero(at_least)[1].reshape(rows, k)
    else:
        candidates = np.stack([np.flatnonzero(row)[np.lexsort((np.flatnonzero(row), -values[row]))[:k]]
                               for row, values in zip(at_least, scores)])
    values = np.take_along_axis(scores, candidates, 1)
    order = np.lexsort((candidates, -values), axis=1)
    return np.take_along_axis(candidates, order, 1)


def beam_candidates(log_probs, scores, k):
    """Per row of log-probabilities [R, vocab] with its beam's running score [R]: the k best
    totals (log-prob + score) and their tokens, best first — what `BeamSearch.step` takes, and
    what the fused `beam_top_k` kernel computes in the decode graph."""
    totals = log_probs + scores.astype(np.float32)[:, None]
    tokens = top_k_descending(totals, k)
    return np.take_along_axis(totals, tokens, 1), tokens


class BeamSearch:
    """The bookkeeping of transformers' beam search (`GenerationMixin._beam_search`), step for
    step on numpy arrays, so that the same log-probabilities choose the same tokens.

    Every step keeps the (1 + number of stop ids) · num_beams best continuations over all beams;
    those ending in a stop id (or at the token budget) among the top num_beams become finished
    hypotheses scored log-prob / length**length_penalty, the best num_beams others run on.
    """

    def __init__(self, batch, num_beams, new_tokens, stop_ids, length_penalty=1.0, early_stopping=False,
                 fill_id=0):
        self.batch, self.num_beams, self.new_tokens = batch, num_beams, new_tokens
        self.stop_ids = np.asarray(sorted(stop_ids), np.int64)
        self.length_penalty, self.early_stopping = float(length_penalty), early_stopping
        self.candidates = max(2, 1 + len(self.stop_ids)) * num_beams
        self.running_tokens = np.full((batch, num_beams, new_tokens), fill_id, np.int64)
        # Only the first beam is live at the start, so the first step does not pick one token num_beams times.
        self.running_scores = np.zeros((batch, num_beams), np.float32)
        self.running_scores[:, 1:] = BEAM_EXCLUDED
        self.finished_tokens = self.running_tokens.copy()
        self.finished_scores = np.full((batch, num_beams), BEAM_EXCLUDED, np.float32)
        self.finished_lengths = np.zeros((batch, num_beams), np.int64)
        self.is_finished = np.zeros((batch, num_beams), bool)
        self.may_improve = np.ones((batch, 1), bool)
        self.length = 0
        self.done = False

    def step(self, candidate_totals, candidate_tokens):
        """Take each running beam's best continuations (`beam_candidates`: totals and tokens
        [batch·num_beams, k], k >= self.candidates, best first); return (row of the previous step
        each beam continues [batch·num_beams], its new token)."""
        batch, beams, length = self.batch, self.num_beams, self.length
        per_beam = candidate_totals.shape[-1]
        totals = candidate_totals.reshape(batch, beams * per_beam)
        tokens = candidate_tokens.reshape(batch, beams * per_beam).astype(np.int64)
        beam_of = np.broadcast_to(np.repeat(np.arange(beams), per_beam), totals.shape)
        # transformers ranks beams x vocab flat: equal totals go to the lower beam, then the lower token.
        top = np.lexsort((tokens, beam_of, -totals), axis=1)[:, :self.candidates]
        top_scores = np.take_along_axis(totals, top, 1)
        top_beams, top_tokens = np.take_along_axis(beam_of, top, 1), np.take_along_axis(tokens, top, 1)
        top_sequences = np.take_along_axis(self.running_tokens, top_beams[:, :, None], 1)
        top_sequences[:, :, length] = top_tokens
        ends = np.isin(top_tokens, self.stop_ids) | (length + 1 >= self.new_tokens)

        still_running = top_scores + ends.astype(np.float32) * BEAM_EXCLUDED
        keep = top_k_descending(still_running, beams)
        self.running_tokens = np.take_along_axis(top_sequences, keep[:, :, None], 1)
        self.running_scores = np.take_along_axis(still_running, keep, 1)
        source_beams = np.take_along_axis(top_beams, keep, 1)

        just_finished = ends & (np.arange(self.candidates) < beams)[None, :]
        scores = top_scores / np.float32((length + 1) ** self.length_penalty)
        full = self.is_finished.all(1, keepdims=True) & (self.early_stopping is True)
        scores = scores + full.astype(np.float32) * BEAM_EXCLUDED
        scores = scores + (~self.may_improve).astype(np.float32) * BEAM_EXCLUDED
        scores = scores + (~just_finished).astype(np.float32) * BEAM_EXCLUDED
        merged_scores = np.concatenate([self.finished_scores, scores], 1)
        best = top_k_descending(merged_scores, beams)
        self.finished_scores = np.take_along_axis(merged_scores, best, 1)
        self.finished_tokens = np.take_along_axis(
            np.concatenate([self.finished_tokens, top_sequences], 1), best[:, :, None], 1)
        self.finished_lengths = np.take_along_axis(
            np.concatenate([self.finished_lengths, np.full(top.shape, length + 1)], 1), best, 1)
        self.is_finished = np.take_along_axis(np.concatenate([self.is_finished, just_finished], 1), best, 1)

        self.length = length = length + 1
        # transformers' heuristic: stop a prompt once its best running beam, at the length that
        # would flatter it most, cannot beat its worst finished one.
        if self.early_stopping == "never" and self.length_penalty > 0:
            hypothetical_length = self.new_tokens
        else:
            hypothetical_length = length
        best_possible = self.running_scores[:, :1] / np.float32(hypothetical_length ** self.length_penalty)
        worst_finished = np.where(self.is_finished, self.finished_scores.min(1, keepdims=True), BEAM_EXCLUDED)
        self.may_improve &= (best_possible > worst_finished).any(1, keepdims=True)
        all_full = self.is_finished.all() and self.early_stopping is True
        self.done = not (self.may_improve.any() and not all_full and not ends.all())
        rows = (np.arange(batch)[:, None] * beams + source_beams).reshape(-1)
        return rows, self.running_tokens[:, :, length - 1].reshape(-1).astype(np.int32)

    def best(self):
        """The best finished hypothesis of each prompt (new tokens, a final stop id included)."""
        return [self.finished_tokens[row, 0, :self.finished_lengths[row, 0]].tolist() for row in range(self.batch)]


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
        self.compiled_shapes = set()

        # Caches are passed unpacked: a tuple argument makes ms.jit compile on every call.
        def cached_forward(input_ids, position_ids, cache_mask, query_slots, *caches):
            return model.forward_cached(input_ids, position_ids, cache_mask, query_slots, caches)

        def full_forward(input_ids, attention_mask, last_index):
            hidden = model.model(input_ids, attention_mask)
            return model.logits_from_hidden(ops.gather(hidden, last_index, 1))[:, 0]

        def gather_rows(rows, *caches):
            gathered = ()
            for cache in caches:
                gathered = gathered + (ops.gather(cache, rows, 0),)
            return gathered

        def reordered_cached_forward(input_ids, position_ids, cache_mask, query_slots, rows, *caches):
            # Beam search: each row continues the beam at `rows`, so its cache comes along first.
            return model.forward_cached(input_ids, position_ids, cache_mask, query_slots, caches, rows)

        self.cached_forward = ms.jit(cached_forward)
        self.full_forward = ms.jit(full_forward)
        self.gather_rows = ms.jit(gather_rows)
        self.reordered_cached_forward = ms.jit(reordered_cached_forward)
        self._beam_forwards = {}

    def beam_forward(self, k):
        """The decode step of beam search that returns each row's k best candidates (totals and
        tokens, from `beam_top_k`) instead of its logits; None where that kernel does not apply."""
        if k not in self._beam_forwards:
            top_k, reordered = beam_top_k(k), self.reordered_cached_forward

            def step(input_ids, position_ids, cache_mask, query_slots, rows, scores, *caches):
                logits, caches = reordered(input_ids, position_ids, cache_mask, query_slots, rows, *caches)
                totals, tokens = top_k(logits, scores)
                return totals, tokens, caches
            self._beam_forwards[k] = None if top_k is None else ms.jit(step)
        return self._beam_forwards[k]

    def generate(self, prompts: Sequence[Sequence[int]], config: GenerationConfig = None,
                 on_step=None, use_cache=None) -> GenerationOutput:
        """Generate for a batch of token-id prompts. `on_step(tokens, active)` is called after
        every step with the new token of each row and which rows were still generating (not
        with beam search, whose best reply is known only at the end; it always uses the cache)."""
        config = config or GenerationConfig()
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ConfigError("generate: every prompt needs at least one token")
        use_cache = config.use_cache if use_cache is None else use_cache
        model_config = self.model.config
        pad_id = model_config.pad_token_id if config.pad_token_id is None else config.pad_token_id
        stop_ids = np.array(sorted(config.stop_ids(model_config)), np.int32)
        if int(config.num_beams) > 1:
            return self._beam_search(prompts, config, pad_id, stop_ids)
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
        tally = SpeedTally(self.compiled_shapes)
        # The recomputing path runs one graph for prefill and decode; the cached one two.
        prefill_shape = ("prefill", batch, prompt_length, total) if use_cache else ("full", batch, total)
        decode_shape = ("decode", batch, total) if use_cache else ("full", batch, total)
        start = time.perf_counter()
        logits = next(steps)
        tally.add("prefill", prefill_shape, int(real_lengths.sum()), time.perf_counter() - start)
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
                tally.add("decode", decode_shape, int(active.sum()), time.perf_counter() - start)
            if on_step is not None:
                on_step(tokens, active.copy())
            active &= ~np.isin(tokens, stop_ids)
            if not active.any():
                break
        steps.close()
        stopped = [bool(seq) and seq[-1] in set(stop_ids.tolist()) for seq in sequences]
        return tally.output(sequences, stopped)

    def _beam_search(self, prompts, config, pad_id, stop_ids):
        """Beam search with the key/value cache: the prompts are prefilled once, their caches
        copied to every beam, then each step reorders the caches to the beams it continues."""
        batch, beams = len(prompts), int(config.num_beams)
        rows = batch * beams
        ids, mask, positions = left_pad(prompts, pad_id, self.prompt_bucket)
        prompt_length = ids.shape[1]
        new_tokens = config.new_token_budget(max(len(p) for p in prompts))
        total = prompt_length + new_tokens
        search = BeamSearch(batch, beams, new_tokens, stop_ids.tolist(), config.length_penalty,
                            config.early_stopping, fill_id=pad_id)
        penalty = float(config.repetition_penalty)
        seen = None
        if penalty != 1.0:
            seen = TokenChooser(config, batch, self.model.config.vocab_size, prompts).seen.repeat(beams, 0)
        real_lengths = np.repeat(mask.sum(1), beams)
        cache_mask = np.zeros((rows, total), np.int32)
        cache_mask[:, :prompt_length] = np.repeat(mask, beams, 0)

        tally = SpeedTally(self.compiled_shapes)
        start = time.perf_counter()
        prefill_mask = np.zeros((batch, total), np.int32)
        prefill_mask[:, :prompt_length] = mask
        logits, caches = self.cached_forward(Tensor(ids), Tensor(positions), Tensor(prefill_mask),
                                             Tensor(np.arange(prompt_length, dtype=np.int32)),
                                             *self.model.empty_caches(batch, total))
        caches = self.gather_rows(Tensor(np.repeat(np.arange(batch, dtype=np.int32), beams)), *caches)
        logits = np.repeat(logits.asnumpy(), beams, 0)
        tally.add("prefill", ("beam prefill", batch, prompt_length, total, beams), int(mask.sum()),
                  time.perf_counter() - start)
        vocab = logits.shape[-1]
        per_row = min(search.candidates, vocab)
        # Without a repetition penalty (applied to every log-probability) the decode graph can
        # pick each row's candidates itself, and only those come back to the host.
        fused = self.beam_forward(per_row) if seen is None else None
        candidates = None
        for step in range(new_tokens):
            start = time.perf_counter()
            if candidates is None:
                log_probs = log_softmax(logits)
                if seen is not None:
                    # transformers applies its logits processors to the log-probabilities in beam search.
                    log_probs = apply_repetition_penalty(log_probs, seen, penalty)
                candidates = beam_candidates(log_probs, search.running_scores.reshape(-1), per_row)
            source_rows, tokens = search.step(*candidates)
            if search.done:
                break
            if seen is not None:
                seen = seen[source_rows]
                seen[np.arange(rows), tokens] = True
            cache_mask[:, prompt_length + step] = 1
            inputs = (Tensor(tokens.reshape(rows, 1)),
                      Tensor((real_lengths + step).astype(np.int32).reshape(rows, 1)), Tensor(cache_mask),
                      Tensor(np.array([prompt_length + step], np.int32)), Tensor(source_rows.astype(np.int32)))
            if fused is not None:
                totals, top_tokens, caches = fused(*inputs, Tensor(search.running_scores.reshape(-1)), *caches)
                candidates = (totals.asnumpy(), top_tokens.asnumpy())
            else:
                logits, caches = self.reordered_cached_forward(*inputs, *caches)
                logits, candidates = logits.asnumpy(), None
            tally.add("decode", ("beam decode", rows, total, fused is not None), rows, time.perf_counter() - start)
        sequences = search.best()
        stop_set = set(stop_ids.tolist())
        stopped = [bool(seq) and seq[-1] in stop_set for seq in sequences]
        return tally.output(sequences, stopped)

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
