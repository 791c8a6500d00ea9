"""The compiled training step: forward and backward on a micro-batch, all-reduce over
data-parallel ranks, global-batch token normalisation, clipping, loss-scale check, AdamW.

The loss of a step is sum(CE over learned tokens) / count(learned tokens), both summed over
every micro-batch of every rank before the division. Gradients are taken of the *sum* and
divided by the global count after the all-reduce, so 2 ranks x batch b, 1 rank x batch 2b and
2 accumulation steps x batch b all compute the same update.

The model may be any cell with `loss_terms(*columns)` → (loss sum, count, [statistics]) and,
if its columns are not BATCH_COLUMNS, a `batch_columns` attribute (the preference loss of
`train/preference.py` takes pairs): statistics (a vector of sums, e.g. of rewards) are summed over
micro-batches and ranks like the loss, and the last step's are in `TrainStep.last_statistics`.
"""
import numpy as np
import mindspore as ms
from mindspore import Parameter, ParameterTuple, Tensor, nn, ops

from mindsft.data.schema import BATCH_COLUMNS
from mindsft.cpu_kernels import adamw_step


class AdamWUpdate(nn.Cell):
    """MindFormers' AdamWeightDecay (no bias correction), fp32 moments named adam_m.*/adam_v.*.

    Weight decay applies to matrices only: norms' scales are not decayed (MindFormers' filter).
    """

    def __init__(self, params, beta1, beta2, eps, weight_decay, skip_on_overflow=False):
        super().__init__(auto_prefix=False)
        self.skip_on_overflow = skip_on_overflow
        self.params = params
        self.moments_m = ParameterTuple(Parameter(ops.zeros(p.shape, ms.float32), name="adam_m." + p.name)
                                        for p in params)
        self.moments_v = ParameterTuple(Parameter(ops.zeros(p.shape, ms.float32), name="adam_v." + p.name)
                                        for p in params)
        self.beta1, self.beta2, self.eps = beta1, beta2, eps
        self.decay = tuple(weight_decay if len(p.shape) >= 2 else 0.0 for p in params)
        # The fused CPU step (one pass over each parameter) for fp32 parameters; it has no
        # overflow skip, which fp16 loss scaling needs, so that keeps the op-by-op update.
        fp32 = all(p.dtype == ms.float32 for p in params)
        self.fused = None if skip_on_overflow or not fp32 else adamw_step()
        # Per parameter: [grad scale, beta1, beta2, eps, decay], after the step's lr.
        self.hyper = tuple(Tensor(np.array([1.0, beta1, beta2, eps, decay], np.float32)) for decay in self.decay)

    def state(self):
        """{name: Parameter} of the optimizer moments, for checkpoints."""
        return {p.name: p for p in tuple(self.moments_m) + tuple(self.moments_v)}

    def construct(self, grads, lr, keep):
        """Apply `grads`; where `keep` is False (an fp16 overflow) nothing changes."""
        done = ()
        if self.fused is not None:
            lr = lr.reshape(1)
            for i in range(len(self.params)):
                param, m, v = self.params[i], self.moments_m[i], self.moments_v[i]
                next_param, next_m, next_v = self.fused(param, m, v, grads[i], ops.concat((lr, self.hyper[i])))
                done += (ops.assign(param, next_param), ops.assign(m, next_m), ops.assign(v, next_v))
            return done
        for i in range(len(self.params)):
            param, m, v, grad = self.params[i], self.moments_m[i], self.moments_v[i], grads[i].astype(ms.float32)
            param32 = param.astype(ms.float32)
            next_m = self.beta1 * m + (1.0 - self.beta1) * grad
            next_v = self.beta2 * v + (1.0 - self.beta2) * grad * grad
            update = next_m / (ops.sqrt(next_v) + self.eps)
            if self.decay[i] > 0.0:
                update = update + self.decay[i] * param32
            next_param = param32 - lr * update
            if self.skip_on_overflow:
                next_param = ops.select(keep, next_param, param32)
                next_m = ops.select(keep, next_m, m)
                next_v = ops.select(keep, next_v, v)
            done += (ops.assign(param, next_param.astype(param.dtype)), ops.assign(m, next_m), ops.assign(v, next_v))
        return done


class TrainStep(nn.Cell):
    """One optimizer step. `step(micro_batches, lr, scale)` → (loss, grad_norm, finite) as numbers.

    A micro-batch is a dict of named columns (`mindsft.data.schema`); the compiled graphs take
    them positionally in BATCH_COLUMNS order, which is the order of the model's `loss_terms`.

    With accumulation, each micro-batch's gradient sums into buffers (`accumulate`), and the
    update (`apply_buffers`) runs once per step; without, one fused graph does both.
    """

    def __init__(self, model, params, optimizer, max_grad_norm=None, world_size=1, accumulation_steps=1,
                 check_overflow=False):
        super().__init__(auto_prefix=False)
        self.model = model
        self.params = ParameterTuple(params)
        self.optimizer = optimizer
        self.max_grad_norm = max_grad_norm
        self.world_size = world_size
        self.check_overflow = check_overflow
        self.columns = getattr(model, "batch_columns", BATCH_COLUMNS)
        self.last_statistics = None
        self.grad_fn = ms.value_and_grad(self.scaled_loss_sum, None, self.params, has_aux=True)
        if world_size > 1:
            self.allreduce = ops.AllReduce()
        self.accumulation_steps = accumulation_steps
        if accumulation_steps > 1:
            self.grad_buffers = ParameterTuple(Parameter(ops.zeros(p.shape, ms.float32), name="accum_grad." + p.name,
                                                         requires_grad=False) for p in params)
            # Kept off the cell tree: they hold this cell, and a cycle of child cells recurses forever.
            object.__setattr__(self, "accumulate", Accumulate(self))
            object.__setattr__(self, "apply_buffers", ApplyBuffers(self))

    def scaled_loss_sum(self, scale, *columns):
        terms = self.model.loss_terms(*columns)
        return (terms[0] * scale,) + tuple(terms[1:])

    def summed(self, statistics):
        """Statistics summed over data-parallel ranks."""
        if self.world_size == 1:
            return statistics
        reduced = ()
        for value in statistics:
            reduced += (self.allreduce(value),)
        return reduced

    def update(self, grads, loss_sum, count, lr, scale):
        """All-reduce, normalise by the global token count, clip, and apply the optimizer."""
        if self.world_size > 1:
            reduced = ()
            for grad in grads:
                reduced += (self.allreduce(grad),)
            grads = reduced
            loss_sum = self.allreduce(loss_sum)
            count = self.allreduce(count)
        tokens = ops.maximum(count, 1.0)
        inverse = 1.0 / (tokens * scale)
        normed = ()
        for grad in grads:
            normed += (grad.astype(ms.float32) * inverse,)
        squares = ()
        for grad in normed:
            squares += (ops.sum(grad * grad),)
        grad_norm = ops.sqrt(ops.addn(squares))
        finite = ops.isfinite(grad_norm)
        keep = finite if self.check_overflow else ops.ones((), ms.bool_)
        if self.max_grad_norm is not None:
            # MindFormers' ClipByGlobalNorm: g * max_norm / max(norm, max_norm).
            factor = self.max_grad_norm / ops.maximum(grad_norm, self.max_grad_norm)
            clipped = ()
            for grad in normed:
                clipped += (grad * factor,)
            normed = clipped
        done = self.optimizer(normed, lr, keep)
        return ops.depend(loss_sum / tokens, done), ops.depend(grad_norm, done), finite

    def construct(self, lr, scale, *columns):
        terms, grads = self.grad_fn(scale, *columns)
        return self.update(grads, terms[0] / scale, terms[1], lr, scale) + self.summed(terms[2:])

    def step(self, micro_batches, lr, scale):
        lr_t = Tensor(lr, ms.float32)
        scale_t = Tensor(scale, ms.float32)
        if self.accumulation_steps == 1:
            loss, grad_norm, finite, *statistics = self(lr_t, scale_t, *tensors_of(micro_batches[0], self.columns))
            statistics = [value.asnumpy() for value in statistics]
        else:
            loss_sum, count, statistics = 0.0, 0.0, None
            for batch in micro_batches:
                part_sum, part_count, *parts = self.accumulate(scale_t, *tensors_of(batch, self.columns))
                loss_sum += float(part_sum.asnumpy())
                count += float(part_count.asnumpy())
                parts = [value.asnumpy() for value in parts]
                statistics = parts if statistics is None else [a + b for a, b in zip(statistics, parts)]
            loss, grad_norm, finite = self.apply_buffers(Tensor(loss_sum, ms.float32), Tensor(count, ms.float32),
                                                         lr_t, scale_t)
        self.last_statistics = statistics or None
        return float(loss.asnumpy()), float(grad_norm.asnumpy()), bool(finite.asnumpy())


def tensors_of(batch, columns=BATCH_COLUMNS):
    """The batch's columns as Tensors, in the order the compiled graphs take them."""
    return tuple(Tensor(batch[name]) for name in columns if name in batch)


class Accumulate(nn.Cell):
    """Adds one micro-batch's gradient of the (scaled) loss sum into the step's buffers."""

    def __init__(self, train_step):
        super().__init__(auto_prefix=False)
        self.train_step = train_step

    def construct(self, scale, *columns):
        terms, grads = self.train_step.grad_fn(scale, *columns)
        done = ()
        for i in range(len(grads)):
            done += (ops.assign_add(self.train_step.grad_buffers[i], grads[i].astype(ms.float32)),)
        return (ops.depend(terms[0] / scale, done), terms[1]) + self.train_step.summed(terms[2:])


class ApplyBuffers(nn.Cell):
    """Runs the update on the accumulated gradients, then empties the buffers."""

    def __init__(self, train_step):
        super().__init__(auto_prefix=False)
        self.train_step = train_step

    def construct(self, loss_sum, count, lr, scale):
        grads = ()
        for buffer in self.train_step.grad_buffers:
            grads += (buffer * 1.0,)
        loss, grad_norm, finite = self.train_step.update(grads, loss_sum, count, lr, scale)
        cleared = ()
        for buffer in self.train_step.grad_buffers:
            cleared += (ops.assign(buffer, ops.zeros_like(buffer)),)
        return ops.depend(loss, cleared), ops.depend(grad_norm, cleared), finite


class EvalStep(nn.Cell):
    """(loss sum, learned-token count[, statistics]) of a batch, summed over data-parallel ranks.

    `eval_step(*tensors_of(batch, eval_step.columns))`."""

    def __init__(self, model, world_size=1):
        super().__init__(auto_prefix=False)
        self.model = model
        self.world_size = world_size
        self.columns = getattr(model, "batch_columns", BATCH_COLUMNS)
        if world_size > 1:
            self.allreduce = ops.AllReduce()

    def construct(self, *columns):
        terms = self.model.loss_terms(*columns)
        if self.world_size == 1:
            return terms
        reduced = ()
        for value in terms:
            reduced += (self.allreduce(value),)
        return reduced
