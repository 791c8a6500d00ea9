"""A small byte-level BPE `tokenizer.json` built on the spot with the `tokenizers` library (as
Llama 3's and Qwen's are), with a `tokenizer_config.json` and its chat template, for the tests
that must run without ../shared."""
import json
import os

from mindsft.data.conversations import normalize_record, read_json_records
from mindsft.demo_model import sample_texts

# The control tokens of every built-in template, so one tokenizer serves them all.
SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|start_header_id|>",
                  "<|end_header_id|>", "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<s>", "</s>",
                  "[INST]", "[/INST]", "<reserved_106>", "<reserved_107>"]

# Llama 3's chat template, the shape Meta ships (a BOS, a header per message, <|eot_id|>).
LLAMA3_JINJA = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
    "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")

# Qwen2.5-Instruct's chat template without its tool branches (the built-in `qwen` has no tools).
QWEN25_JINJA = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) or "
    "(message.role == 'assistant') %}"
    "{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}")

# Mistral 7B Instruct v0.3's chat template without its tool branches.
MISTRAL_V03_JINJA = (
    "{%- if messages[0][\"role\"] == \"system\" %}"
    "{%- set system_message = messages[0][\"content\"] %}{%- set loop_messages = messages[1:] %}"
    "{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{{- bos_token }}"
    "{%- for message in loop_messages %}"
    "{%- if message[\"role\"] == \"user\" %}"
    "{%- if loop.last and system_message is defined %}"
    "{{- \"[INST] \" + system_message + \"\\n\\n\" + message[\"content\"] + \"[/INST]\" }}"
    "{%- else %}{{- \"[INST] \" + message[\"content\"] + \"[/INST]\" }}{%- endif %}"
    "{%- elif message[\"role\"] == \"assistant\" %}"
    "{{- \" \" + message[\"content\"]|trim + eos_token}}"
    "{%- endif %}{%- endfor %}")

EXTRA_TEXTS = ["héllo ünï 1 2 \n foo 😀", "  leading spaces", "日本語のテキスト\t\tend ", "x  y   z ",
               "a\u00a0b", "\n\nnew", "emoji 👩‍👩‍👧 and ﬁ ligature", "tabs\tand\r\nwindows lines"]


def training_texts():
    return sample_texts() + EXTRA_TEXTS * 3


def write_bpe_tokenizer(folder, chat_template=LLAMA3_JINJA, bos="<|begin_of_text|>", eos="<|eot_id|>",
                        pad=None, generation_eos=None, vocab_size=700, nfc=False):
    """A byte-level BPE trained on the sample texts, written as a HuggingFace tokenizer folder
    (tokenizer.json, tokenizer_config.json, and generation_config.json when `generation_eos` lists
    end ids). Its post-processor puts `bos` before a text, as Llama 3's does. Returns the folder."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    if nfc:
        tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(training_texts(), trainer)
    if bos:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.token_to_id(bos))])
    os.makedirs(folder, exist_ok=True)
    tokenizer.save(os.path.join(folder, "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos,
              "chat_template": chat_template, "clean_up_tokenization_spaces": False}
    if pad:
        config["pad_token"] = pad
    with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, ensure_ascii=False, indent=2)
    if generation_eos:
        with open(os.path.join(folder, "generation_config.json"), "w", encoding="utf-8") as f:
            json.dump({"eos_token_id": generation_eos}, f)
    return folder


def load_conversations(path):
    return [normalize_record(record) for record in read_json_records(path)]


def learned_runs(ids, learned):
    """The learned tokens as runs of consecutive ids (one run per reply)."""
    runs, current = [], []
    for token_id, flag in zip(ids, learned):
        if flag:
            current.append(token_id)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return runs
