"""Continuous batching: one decode loop over a fixed-shape key/value cache that takes new requests
between steps and lets finished or abandoned ones go, so that requests arriving together decode
together.

The cache has up to `rows` rows (as many as the next power of two that holds the running and
waiting sequences) of `cache_length` slots. Every decode step writes all rows at one shared slot
(what `LlamaModel.construct_cached` supports: one query slot for the batch); each row has its own
positions and its own mask of the slots it holds, so rows that joined at different steps attend
only to their own tokens. Waiting requests join by one prefill of as many of them as a power of
two, which writes their (left-padded) prompts into the slots just before the shared write slot;
those cache rows are scattered into free rows of the batch. When the write slot reaches the end,
every row's slots move left by the start of the oldest row (one gather along the slot axis); a
row never holds more slots than the cache has, because its prompt plus its token budget fit the
cache. So the decode step, the prefill of each group size and prompt bucket, the row scatter and
the move each compile once per batch size.
"""
import collections
import dataclasses
import threading
import time
from typing import Callable, List, Optional

import mindspore as ms
import numpy as np
from mindspore import Tensor, ops

from mindsft.generate import Generator, TokenChooser, left_pad
from mindsft.generation_config import GenerationConfig


@dataclasses.dataclass
class Request:
    """One sequence to generate. `sink(event)` receives ("token", id) for every new token (a stop
    token included), then ("done", "stop" | "length" | "cancelled") or ("error", message); it is
    called from the decode loop's thread and must not block."""
    prompt_ids: List[int]
    config: GenerationConfig
    max_new_tokens: int
    stop_ids: frozenset
    sink: Callable
    adapter: Optional[str] = None
    cancelled: bool = False
    submitted_at: float = dataclasses.field(default_factory=time.perf_counter)

    def cancel(self):
        """Free the request's row at the next step (a client that went away)."""
        self.cancelled = True


class Row:
    """A request being decoded in one row of the cache."""

    def __init__(self, request, start_slot, prompt_slots, chooser, position):
        self.request, self.start_slot, self.prompt_slots, self.chooser = request, start_slot, prompt_slots, chooser
        self.position = position          # position id of the next token written to the cache
        self.generated = 0
        self.last_token = None


class ContinuousBatcher:
    """The decode loop, on a thread of its own (MindSpore runs only there).

    model: a LlamaForCausalLM with weights loaded; rows: sequences decoded together;
    cache_length: slots per row (a prompt plus its new tokens must fit);
    switch_adapter(name): makes `name`'s LoRA weights the model's (requests of one adapter share
    the batch; another adapter's requests wait until the batch drains)."""

    def __init__(self, model, rows, cache_length, pad_id, prompt_bucket=16, switch_adapter=None):
        self.model, self.max_rows, self.cache_length = model, rows, cache_length
        # The batch is as many rows as the next power of two that holds its sequences (a decode
        # step of 8 rows took 1.6x the time of 1 row on the CPU): one compiled step per size.
        self.row_sizes = sorted({min(2 ** k, rows) for k in range(rows.bit_length() + 1)})
        self.num_rows = 1
        self.pad_id, self.prompt_bucket = pad_id, prompt_bucket
        self.switch_adapter = switch_adapter
        self.active_adapter = None
        self.generator = Generator(model, prompt_bucket)
        self.caches = None
        self.cache_mask = np.zeros((1, cache_length), np.int32)
        self.write_slot = 0
        self.rows: List[Optional[Row]] = [None]
        self.waiting = collections.deque()
        self.condition = threading.Condition()
        self.stopping = False
        self.steps = 0
        self.cancelled = 0
        self.moves = 0

        def put_rows(rows, *caches):
            count = len(caches) // 2
            out = ()
            for index in range(count):
                out = out + (ops.tensor_scatter_update(caches[index], rows, caches[count + index]),)
            return out

        def move_slots(slot_index, *caches):
            out = ()
            for cache in caches:
                out = out + (ops.gather(cache, slot_index, 2),)
            return out

        self.put_rows = ms.jit(put_rows)
        self.move_slots = ms.jit(move_slots)
        self.thread = threading.Thread(target=self._loop, name="mindsft-decode", daemon=True)
        self.thread.start()

    def prompt_slots(self, prompt_length):
        """Slots a prompt of this many tokens takes (left-padded to the prompt bucket)."""
        return -(-prompt_length // self.prompt_bucket) * self.prompt_bucket

    def submit(self, request):
        with self.condition:
            if self.stopping:
                raise RuntimeError("the decode loop has stopped")
            self.waiting.append(request)
            self.condition.notify()
        return request

    def load(self):
        """{"running": rows decoding, "waiting": requests queued, "cancelled": rows given up so far}."""
        return {"running": sum(row is not None for row in self.rows), "waiting": len(self.waiting),
                "cancelled": self.cancelled}

    def stop(self, timeout=10.0):
        """End the loop; requests still waiting or running are told ("done", "cancelled")."""
        with self.condition:
            self.stopping = True
            self.condition.notify()
        self.thread.join(timeout)

    # ---- the loop (decode thread only) ----------------------------------------------------

    def _loop(self):
        while True:
            with self.condition:
                while not self.stopping and not self.waiting and not self._active():
                    self.condition.wait()
                if self.stopping:
                    break
            self._drop_cancelled()
            self._fit_rows()
            self._admit_waiting()
            if self._active():
                try:
                    self._decode_step()
                except Exception as err:  # a failed step fails the requests in it, not the server
                    for index in self._active():
                        self._finish(index, "error", f"generation failed: {type(err).__name__}: {err}")
        for index in self._active():
            self._finish(index, "done", "cancelled")
        with self.condition:
            while self.waiting:
                self.waiting.popleft().sink(("done", "cancelled"))

    def _active(self):
        return [index for index, row in enumerate(self.rows) if row is not None]

    def _drop_cancelled(self):
        for index in self._active():
            if self.rows[index].request.cancelled:
                self.cancelled += 1
                self._finish(index, "done", "cancelled")
        with self.condition:
            kept = [r for r in self.waiting if not r.cancelled]
            for request in self.waiting:
                if request.cancelled:
                    request.sink(("done", "cancelled"))
            self.waiting = collections.deque(kept)

    def _fit_rows(self):
        """Resize the batch to the smallest size that holds the running and waiting sequences,
        moving the running rows to the front."""
        active = self._active()
        with self.condition:
            wanted = min(self.max_rows, len(active) + len(self.waiting))
        size = next(size for size in self.row_sizes if size >= max(wanted, 1))
        if size == self.num_rows:
            return
        if active:
            index = (active + [active[0]] * size)[:size]
            self.caches = self.generator.gather_rows(Tensor(np.asarray(index, np.int32)), *self.caches)
        else:
            self.caches = None
        mask = np.zeros((size, self.cache_length), np.int32)
        mask[:len(active)] = self.cache_mask[active]
        self.cache_mask = mask
        self.rows = [self.rows[i] for i in active] + [None] * (size - len(active))
        self.num_rows = size

    def _admit_waiting(self):
        while self._admit_group():
            pass

    def _admit_group(self):
        """Prefill the longest run of waiting requests that can join now, as many as a power of
        two (one prefill graph per group size and prompt bucket); False if none could."""
        with self.condition:
            free = self.rows.count(None)
            active = self._active()
            group = []
            for request in self.waiting:
                if len(group) >= free:
                    break
                adapter = group[0].adapter if group else (self.active_adapter if active else request.adapter)
                if request.adapter != adapter:
                    break  # another adapter's turn comes when this batch drains
                candidates = group + [request]
                slots = max(self.prompt_slots(len(r.prompt_ids)) for r in candidates)
                if any(slots + r.max_new_tokens > self.cache_length for r in candidates) or not self._fits(slots):
                    break
                group.append(request)
            if not group:
                return False
            group = group[:1 << (len(group).bit_length() - 1)]
            for _ in group:
                self.waiting.popleft()
        try:
            self._admit(group)
        except Exception as err:
            for request in group:
                request.sink(("error", f"generation failed: {type(err).__name__}: {err}"))
            for index, row in enumerate(self.rows):
                if row is not None and any(row.request is r for r in group):
                    self.rows[index] = None
                    self.cache_mask[index] = 0
        return True

    def _fits(self, slots):
        """Whether prompts of `slots` slots fit before the write slot, now or after moving every
        row right (which must leave each its budget); an empty batch starts over."""
        if not self._active() or self.write_slot >= slots:
            return True
        ends = [row.start_slot + row.prompt_slots + row.request.max_new_tokens for row in self.rows if row is not None]
        return max(ends) + slots - self.write_slot <= self.cache_length

    def _move(self, shift):
        """Move every row's slots `shift` to the left (right when negative)."""
        self.moves += 1
        index = np.clip(np.arange(self.cache_length) + shift, 0, self.cache_length - 1).astype(np.int32)
        self.caches = self.move_slots(Tensor(index), *self.caches)
        moved = np.zeros_like(self.cache_mask)
        if shift >= 0:
            moved[:, :self.cache_length - shift] = self.cache_mask[:, shift:]
        else:
            moved[:, -shift:] = self.cache_mask[:, :self.cache_length + shift]
        self.cache_mask = moved
        self.write_slot -= shift
        for row in self.rows:
            if row is not None:
                row.start_slot -= shift

    def _admit(self, group):
        ids, mask, positions = left_pad([r.prompt_ids for r in group], self.pad_id, self.prompt_bucket)
        count, length = ids.shape
        fresh = not self._active()
        if fresh:
            if group[0].adapter != self.active_adapter and self.switch_adapter is not None:
                self.switch_adapter(group[0].adapter)
            self.active_adapter = group[0].adapter
            self.cache_mask[:] = 0
            self.write_slot = length
        elif self.write_slot < length:
            self._move(self.write_slot - length)
        start = self.write_slot - length
        rows_mask = np.zeros((count, self.cache_length), np.int32)
        rows_mask[:, start:self.write_slot] = mask
        logits, row_caches = self.generator.cached_forward(
            Tensor(ids), Tensor(positions), Tensor(rows_mask),
            Tensor(np.arange(start, self.write_slot, dtype=np.int32)),
            *self.model.empty_caches(count, self.cache_length))
        free = [index for index, row in enumerate(self.rows) if row is None][:count]
        if fresh and count == self.num_rows:
            self.caches = row_caches
        else:
            if self.caches is None:
                self.caches = self.model.empty_caches(self.num_rows, self.cache_length)
            self.caches = self.put_rows(Tensor(np.asarray(free, np.int32).reshape(count, 1)), *self.caches,
                                        *row_caches)
        logits = logits.asnumpy()
        for position, (index, request) in enumerate(zip(free, group)):
            self.cache_mask[index] = rows_mask[position]
            chooser = TokenChooser(request.config, 1, self.model.config.vocab_size, [request.prompt_ids])
            self.rows[index] = Row(request, start, length, chooser, position=len(request.prompt_ids))
        for position, index in enumerate(free):
            self._take(index, logits[position:position + 1])

    def _take(self, index, logits):
        """Choose row `index`'s next token from its logits [1, vocab], hand it over, and end the
        row at a stop token or its budget."""
        row = self.rows[index]
        token = int(row.chooser(logits)[0])
        row.chooser.record(np.array([token], np.int32), np.array([True]))
        row.generated += 1
        row.last_token = token
        row.request.sink(("token", token))
        if token in row.request.stop_ids:
            self._finish(index, "done", "stop")
        elif row.generated >= row.request.max_new_tokens:
            self._finish(index, "done", "length")

    def _finish(self, index, kind, detail):
        row = self.rows[index]
        self.rows[index] = None
        self.cache_mask[index] = 0
        row.request.sink((kind, detail))

    def _decode_step(self):
        if self.write_slot >= self.cache_length:
            oldest = min(self.rows[index].start_slot for index in self._active())
            assert oldest > 0, "a row outgrew the cache"
            self._move(oldest)
        active = self._active()
        tokens = np.full((self.num_rows, 1), self.pad_id, np.int32)
        positions = np.zeros((self.num_rows, 1), np.int32)
        for index in active:
            row = self.rows[index]
            tokens[index, 0], positions[index, 0] = row.last_token, row.position
            self.cache_mask[index, self.write_slot] = 1
        logits, self.caches = self.generator.cached_forward(
            Tensor(tokens), Tensor(positions), Tensor(self.cache_mask),
            Tensor(np.array([self.write_slot], np.int32)), *self.caches)
        self.write_slot += 1
        self.steps += 1
        logits = logits.asnumpy()
        for index in active:
            self.rows[index].position += 1
            self._take(index, logits[index:index + 1])
