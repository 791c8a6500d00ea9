"""A LoRA run on the tiny config learns, keeps the base frozen, and checkpoints only its adapters."""
import mindspore as ms
import numpy as np
from mindspore import nn

from mindsft.lora import LoraConfig, adapter_state, apply_lora, load_adapter_state
from mindsft.models.llama import LlamaConfig, LlamaForCausalLM
from mindsft.demo_model import TINY_CONFIG


def tiny_model():
    ms.set_seed(0)
    # With the default init (std 0.02) the frozen random head caps every logit near 1, so no adapter
    # can lower the loss much; std 0.2 gives the head the range a pretrained one has.
    return LlamaForCausalLM(LlamaConfig(**{**TINY_CONFIG, "initializer_range": 0.2}))


def compiled_train_step(model, learning_rate):
    """One compiled AdamW step over the model's trainable parameters, as the trainer builds it."""
    optimizer = nn.AdamWeightDecay(model.trainable_params(), learning_rate=learning_rate, weight_decay=0.0)
    grad_fn = ms.value_and_grad(model, None, optimizer.parameters)

    @ms.jit
    def train_step(input_ids, labels):
        loss, grads = grad_fn(input_ids, labels)
        optimizer(grads)
        return loss

    return optimizer, train_step


def fixed_batch(vocab_size, batch=4, seq=33):
    rng = np.random.RandomState(0)
    input_ids = rng.randint(3, vocab_size, (batch, seq)).astype(np.int32)
    labels = input_ids.copy()
    labels[:, :8] = -100
    return ms.Tensor(input_ids), ms.Tensor(labels)


def test_lora_run_learns_with_only_adapters_in_the_optimizer_and_checkpoints_a_small_fraction(tmp_path):
    model = tiny_model()
    base_before = {p.name: p.asnumpy().copy() for p in model.get_parameters()}
    chosen = apply_lora(model, LoraConfig.from_mindformers(
        {"pet_type": "lora", "lora_rank": 8, "lora_alpha": 16, "lora_dropout": 0.0,
         "target_modules": ".*wq|.*wk|.*wv|.*wo"}))
    optimizer, train_step = compiled_train_step(model, learning_rate=3e-3)
    adapter_names = set(adapter_state(model))
    assert {p.name for p in optimizer.parameters} == adapter_names
    assert len(optimizer.moments1) == len(adapter_names) == 2 * len(chosen)

    input_ids, labels = fixed_batch(model.config.vocab_size)
    losses = [float(train_step(input_ids, labels).asnumpy()) for _ in range(25)]
    assert losses[-1] < 0.5 * losses[0], losses

    for param in model.get_parameters():
        if param.name in base_before:
            assert np.array_equal(param.asnumpy(), base_before[param.name]), f"{param.name} moved"

    adapter_ckpt, full_ckpt = tmp_path / "adapter.ckpt", tmp_path / "full.ckpt"
    ms.save_checkpoint(list(adapter_state(model).values()), str(adapter_ckpt))
    ms.save_checkpoint(model, str(full_ckpt))
    assert set(ms.load_checkpoint(str(adapter_ckpt))) == adapter_names
    assert adapter_ckpt.stat().st_size < 0.1 * full_ckpt.stat().st_size

    # Resume: the same base, fresh adapters drawn from another seed, then the checkpoint's adapters.
    resumed = tiny_model()
    apply_lora(resumed, model.lora_config, seed=7)
    load_adapter_state(resumed, ms.load_checkpoint(str(adapter_ckpt)), source=str(adapter_ckpt))
    assert np.array_equal(resumed(input_ids).asnumpy(), model(input_ids).asnumpy())


def test_lora_dropout_is_active_in_training_and_off_in_evaluation():
    model = tiny_model()
    apply_lora(model, LoraConfig(rank=4, alpha=8, dropout=0.5, target_modules=".*w1|.*w3"))
    for name, param in adapter_state(model).items():
        if name.endswith("lora_b"):
            param.set_data(ms.Tensor(np.full(param.shape, 0.1, np.float32)))
    input_ids, _ = fixed_batch(model.config.vocab_size, batch=1, seq=9)
    model.set_train(False)
    assert np.array_equal(model(input_ids).asnumpy(), model(input_ids).asnumpy())
    model.set_train(True)
    assert not np.array_equal(model(input_ids).asnumpy(), model(input_ids).asnumpy())
