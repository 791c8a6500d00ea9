"""Shared pieces of the data-pipeline tests: a tokenizer trained on the built-in sample, and
MindFormers' per-sample qa method reimplemented from its source (the reference we compare to)."""
import numpy as np
import sentencepiece as spm

IGNORE = -100


def mindformers_qa(sources, model_file, length):
    """MindFormers' llama_preprocess `preprocess()` for ShareGPT `conversations` lists: ids, labels.

    Its LlamaTokenizer (add_bos and add_eos on) is sentencepiece plus BOS/EOS; its conversation
    module is FastChat's vicuna_v1.1, used here directly.
    """
    from fastchat.conversation import get_conv_template
    sp = spm.SentencePieceProcessor(model_file=str(model_file))

    def tokenize(text):
        return [sp.bos_id()] + sp.encode(text) + [sp.eos_id()]

    conv = get_conv_template("vicuna_v1.1")
    roles = {"human": conv.roles[0], "gpt": conv.roles[1]}
    prompts = []
    for source in sources:
        if roles[source[0]["from"]] != conv.roles[0]:
            source = source[1:]
        conv.messages = []
        for j, sentence in enumerate(source):
            assert roles[sentence["from"]] == conv.roles[j % 2]
            conv.append_message(roles[sentence["from"]], sentence["value"])
        prompts.append(conv.get_prompt())
    sep = conv.sep + conv.roles[1] + ": "
    all_ids, all_labels = [], []
    for prompt in prompts:
        rounds = prompt.split(conv.sep2)
        ids = [sp.bos_id()]
        for rou in rounds:
            if rou == "":
                break
            ids.extend(tokenize(rou)[1:])
        padded = ids + [0] * max(0, length - len(ids))
        all_ids.append(padded[:length])
        target = np.array(padded)
        total_len = int(np.not_equal(target, 0).sum())
        cur_len = 1
        target[:cur_len] = IGNORE
        for rou in rounds:
            if rou == "":
                break
            parts = rou.split(sep)
            if len(parts) != 2:
                break
            parts[0] += sep
            round_len = len(tokenize(rou)) - 1
            instruction_len = len(tokenize(parts[0])) - 3
            target[cur_len:cur_len + instruction_len] = IGNORE
            cur_len += round_len
        target[cur_len:] = IGNORE
        if cur_len < length:
            if cur_len != total_len:
                target[:] = IGNORE
        else:
            target = target[:length]
        all_labels.append(target.tolist())
    return np.array(all_ids, dtype=np.int32), np.array(all_labels, dtype=np.int32)
