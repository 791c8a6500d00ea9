"""Build the same random Llama in transformers (the reference) and in mindsft."""
import numpy as np
import torch
import transformers

from mindsft.models.families import hf_to_ms_arrays, model_config_from_hf
from mindsft.models.llama import LlamaForCausalLM
from mindsft.loading import assign_weights


def random_hf_llama(seed=0, **config):
    """A transformers LlamaForCausalLM with random weights, norm weights perturbed away from 1."""
    torch.manual_seed(seed)
    defaults = dict(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                    num_attention_heads=6, num_key_value_heads=6, max_position_embeddings=128,
                    rms_norm_eps=1e-5)
    hf_config = transformers.LlamaConfig(**{**defaults, **config})
    model = transformers.LlamaForCausalLM(hf_config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
    return model


def mindsft_twin(hf_model):
    """Our LlamaForCausalLM holding exactly the weights of `hf_model`."""
    config = model_config_from_hf(hf_model.config.to_dict())
    model = LlamaForCausalLM(config)
    arrays = hf_to_ms_arrays({k: v.detach().float().numpy() for k, v in hf_model.state_dict().items()}, config)
    if config.tie_word_embeddings:
        arrays.pop("lm_head.weight", None)
    assign_weights(model, arrays, source="transformers state_dict")
    return model


def random_batch(vocab_size, batch=2, seq=17, seed=0):
    rng = np.random.RandomState(seed)
    input_ids = rng.randint(0, vocab_size, (batch, seq)).astype(np.int32)
    labels = input_ids.copy()
    labels[:, :5] = -100
    labels[-1, seq // 2:] = -100
    return input_ids, labels


def assert_adapter_gradients_equal_peft(ours, peft_model, input_ids, labels, module_of, rtol=1e-3):
    """The loss gradients of every LoRA A/B in `ours` equal PEFT's for the same batch; returns how
    many adapter tensors were compared. `module_of` maps our module name to PEFT's."""
    import mindspore as ms
    from mindsft.lora import LORA_A, LORA_B
    peft_model.zero_grad()
    peft_model(torch.from_numpy(input_ids).long(), labels=torch.from_numpy(labels).long()).loss.backward()
    expected = {}
    for name, param in peft_model.named_parameters():
        if param.requires_grad:
            module = name[len("base_model.model."):].rsplit(".lora_", 1)[0]
            expected[(module, LORA_A if ".lora_A." in name else LORA_B)] = param.grad.numpy()
    params = ours.trainable_params()
    grads = ms.grad(lambda ids, lab: ours(ids, lab), grad_position=None, weights=params)(
        ms.Tensor(input_ids), ms.Tensor(labels))
    assert len(grads) == len(expected) > 0
    for param, grad in zip(params, grads):
        module, ab = param.name.rsplit(".", 1)
        want = expected[(module_of(module), ab)]
        relative = np.abs(grad.asnumpy() - want).max() / (np.abs(want).max() + 1e-12)
        assert relative <= rtol, f"{param.name}: relative difference {relative:.2e}"
    return len(grads)
