"""MindFormers' own research runbooks (Llama 3.1, Qwen2.5) as a MindFormers user runs them: their
YAMLs unchanged (tests/mindformers_yamls/), their tokenizer files, their data layout and flags."""
import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from trainkit import ROOT, env, losses

YAMLS = Path(__file__).parent / "mindformers_yamls"
SHARED = ROOT.parent / "shared" / "data" / "tokenizers"
LLAMA3_1_JSON = SHARED / "llama3_1" / "tokenizer.json"
QWEN_JSON = SHARED / "qwen3" / "tokenizer.json"
TEXTS = ["Hello world!  It's 12345 tokens\n\n  ok", "中文测试，你好。", "émigré naïve 🤖 e\u0301",
         "   leading spaces\t\ttabs\r\n", "don't STOP'll 3.14159", "a" * 40]


def run_tool(script, *args, timeout=300):
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=ROOT, env=env(),
                          capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------------------- the YAMLs

@pytest.mark.parametrize("name", ["finetune_llama3_1_8b.yaml", "finetune_qwen2_5_0_5b_8k.yaml",
                                  "finetune_qwen2_5_7b_8k.yaml"])
def test_research_yamls_load_as_written_and_say_what_changes_nothing(name):
    from mindsft.config import load_run_config
    config = load_run_config(YAMLS / name, {"context.device_target": "CPU"})
    assert "remote_save_url" in config.no_effect and "trainer" in config.no_effect
    # bfloat16 on CPU: computed in float32, said once, never a kernel traceback.
    assert config.model_config.compute_dtype == config.model_config.param_init_type == "float32"
    assert len(config.notes) == 1 and "compute_dtype bfloat16" in config.notes[0] and "float32 on CPU" in config.notes[0]


def test_a_misspelt_key_of_a_research_yaml_still_fails_naming_the_nearest(tmp_path):
    from mindsft.config import load_run_config
    from mindsft.errors import ConfigError
    text = (YAMLS / "finetune_qwen2_5_0_5b_8k.yaml").read_text().replace("merges_file:", "merge_file:")
    (tmp_path / "bad.yaml").write_text(text)
    with pytest.raises(ConfigError, match="did you mean 'merges_file'"):
        load_run_config(tmp_path / "bad.yaml")


# ---------------------------------------------------------------------------- tokenizers

def write_tiktoken_file(path, token_bytes):
    with open(path, "w") as f:
        for rank, token in enumerate(token_bytes):
            f.write(f"{base64.b64encode(token).decode()} {rank}\n")
    return path


def tiktoken_reference(token_bytes):
    """tiktoken itself, set up as MindFormers' llama3_1_tokenizer.py sets it up."""
    import tiktoken
    from mindsft.tokenizer.tiktoken_model import LLAMA3_SPECIAL_TOKENS, LLAMA3_SPLIT_PATTERN
    ranks = {token: rank for rank, token in enumerate(token_bytes)}
    specials = {text: len(ranks) + i for i, text in enumerate(LLAMA3_SPECIAL_TOKENS)}
    return tiktoken.Encoding("Llama3", pat_str=LLAMA3_SPLIT_PATTERN, mergeable_ranks=ranks, special_tokens=specials)


def tiny_tiktoken_bytes():
    """A tiny tiktoken vocabulary: the 256 bytes, then merges learned by a byte-level BPE trainer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from mindsft.demo_model import sample_texts
    from mindsft.tokenizer.bpe_vocab_merges import byte_to_char
    trainer_model = Tokenizer(models.BPE())
    trainer_model.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer_model.train_from_iterator(sample_texts()[:200], trainers.BpeTrainer(
        vocab_size=600, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    char_to_byte = {c: b for b, c in byte_to_char().items()}
    learned = sorted(trainer_model.get_vocab().items(), key=lambda item: item[1])
    tokens = [bytes([b]) for b in range(256)]
    tokens += [bytes(char_to_byte[c] for c in text) for text, _ in learned if len(text) > 1]
    return tokens


def test_a_tiktoken_tokenizer_model_encodes_as_tiktoken_does():
    from mindsft.tokenizer import TiktokenTokenizer, load_tokenizer
    from mindsft.demo_model import sample_texts
    import tempfile
    tokens = tiny_tiktoken_bytes()
    with tempfile.TemporaryDirectory() as folder:
        tokenizer = load_tokenizer(write_tiktoken_file(os.path.join(folder, "tokenizer.model"), tokens))
    assert isinstance(tokenizer, TiktokenTokenizer)
    reference = tiktoken_reference(tokens)
    for text in TEXTS + sample_texts()[200:260] + ["<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"]:
        assert tokenizer.encode(text) == reference.encode(text, allowed_special="all"), text
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (len(tokens), len(tokens) + 1, len(tokens) + 2)
    assert tokenizer.token_to_id("<|eot_id|>") == len(tokens) + 9 and tokenizer.vocab_size == len(tokens) + 256


@pytest.fixture(scope="module")
def llama3_1_tiktoken(tmp_path_factory):
    """Llama 3.1's tokenizer.model as Meta ships it, derived from the shared tokenizer.json."""
    if not LLAMA3_1_JSON.is_file():
        pytest.skip(f"the shared Llama 3.1 tokenizer ({LLAMA3_1_JSON}) is absent")
    from mindsft.tokenizer.bpe_vocab_merges import byte_to_char
    char_to_byte = {c: b for b, c in byte_to_char().items()}
    vocab = json.loads(LLAMA3_1_JSON.read_text())["model"]["vocab"]
    tokens = [bytes(char_to_byte[c] for c in text) for text, _ in sorted(vocab.items(), key=lambda item: item[1])]
    folder = tmp_path_factory.mktemp("llama3_1_original")
    return write_tiktoken_file(folder / "tokenizer.model", tokens), tokens


def test_llama3_1_tiktoken_file_gives_the_ids_of_its_tokenizer_json_and_of_tiktoken(llama3_1_tiktoken):
    from tokenizers import Tokenizer
    from mindsft.tokenizer import load_tokenizer
    from mindsft.demo_model import sample_texts
    path, tokens = llama3_1_tiktoken
    ours, reference = load_tokenizer(path), Tokenizer.from_file(str(LLAMA3_1_JSON))
    tiktoken_model = tiktoken_reference(tokens)
    for text in TEXTS + sample_texts()[:100]:
        ids = ours.encode(text)
        assert ids == reference.encode(text, add_special_tokens=False).ids == tiktoken_model.encode(text), text
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (128000, 128001, 128002)


def test_llama3_1_preprocess_with_tiktoken_and_with_tokenizer_json_writes_identical_mindrecords(
        llama3_1_tiktoken, tmp_path):
    path, _ = llama3_1_tiktoken
    json_folder = tmp_path / "hf"
    json_folder.mkdir()
    (json_folder / "tokenizer.json").write_bytes(LLAMA3_1_JSON.read_bytes())
    # MindFormers' Llama3Tokenizer defaults, which the tiktoken path takes.
    (json_folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>", "pad_token": "<|reserved_special_token_0|>"}))
    conv = tmp_path / "conv.json"
    assert run_tool("tools/alpaca_converter.py", "--data_path", ROOT / "mindsft/sample_data/alpaca_sample.json",
                    "--output_path", conv).returncode == 0
    outputs = []
    for name, model_file in (("tiktoken", path), ("json", json_folder / "tokenizer.json")):
        out = tmp_path / name / "alpaca.mindrecord"
        result = run_tool("tools/llama_preprocess.py", "--dataset_type", "qa", "--input_glob", conv,
                          "--model_file", model_file, "--seq_length", 64, "--output_file", out, "--no_progress")
        assert result.returncode == 0, result.stderr[-2000:]
        outputs.append(out)
    assert outputs[0].read_bytes() == outputs[1].read_bytes()


def write_vocab_merges(tokenizer_json, folder):
    model = json.loads(Path(tokenizer_json).read_text())["model"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False))
    with open(folder / "merges.txt", "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        for merge in model["merges"]:
            f.write((merge if isinstance(merge, str) else " ".join(merge)) + "\n")
    return folder / "vocab.json", folder / "merges.txt"


def tiny_qwen_tokenizer_json(folder):
    from mindsft.demo_model import sample_texts, train_bpe_tokenizer
    folder.mkdir(parents=True, exist_ok=True)
    train_bpe_tokenizer(sample_texts(), str(folder), "qwen2", vocab_size=512)
    # A Qwen2 vocabulary ends before its special tokens: drop the trainer's, which it put first.
    data = json.loads((folder / "tokenizer.json").read_text())
    vocab = {t: i for t, i in data["model"]["vocab"].items() if not t.startswith("<|")}
    data["model"]["vocab"] = {t: n for n, (t, _) in enumerate(sorted(vocab.items(), key=lambda item: item[1]))}
    (folder / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False))
    return folder / "tokenizer.json"


@pytest.mark.parametrize("source", ["tiny", "qwen"])
def test_vocab_json_and_merges_txt_give_transformers_qwen2_tokenizer_ids(source, tmp_path):
    import transformers
    from mindsft.tokenizer import VocabMergesTokenizer, load_tokenizer
    from mindsft.demo_model import sample_texts
    if source == "qwen" and not QWEN_JSON.is_file():
        pytest.skip(f"the shared Qwen tokenizer ({QWEN_JSON}) is absent")
    tokenizer_json = QWEN_JSON if source == "qwen" else tiny_qwen_tokenizer_json(tmp_path / "trained")
    vocab, merges = write_vocab_merges(tokenizer_json, tmp_path / "files")
    ours = load_tokenizer(vocab, merges)
    assert isinstance(ours, VocabMergesTokenizer)
    reference = transformers.Qwen2Tokenizer.from_pretrained(str(tmp_path / "files"))
    reference.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    for text in TEXTS + sample_texts()[:50] + ["<|im_start|>user\nhi<|im_end|>\n<|endoftext|>"]:
        assert ours.encode(text) == reference(text)["input_ids"], text
    size = len(json.loads(vocab.read_text()))
    assert (ours.eos_id, ours.pad_id, ours.bos_id) == (size, size, None)
    assert ours.end_ids == (size, size + 2)


# ---------------------------------------------------------------------------- the Qwen2.5 runbook

@pytest.fixture(scope="module")
def qwen_model(tmp_path_factory):
    """A tiny random Qwen2, its vocab.json/merges.txt, converted as the runbook converts (bf16)."""
    from mindsft.demo_model import write_tiny_hf_llama
    folder = tmp_path_factory.mktemp("qwen")
    config = write_tiny_hf_llama(folder / "hf", family="qwen2", vocab_size=600, seq_length=32)
    vocab, merges = write_vocab_merges(tiny_qwen_tokenizer_json(folder / "tok"), folder / "tok")
    ckpt = folder / "qwen2_5.ckpt"
    result = run_tool("tools/convert_weight.py", "--model", "qwen2_5", "--input_path", folder / "hf",
                      "--output_path", ckpt, "--dtype", "bf16")
    assert result.returncode == 0, result.stderr[-2000:]
    return config, folder, vocab, merges, ckpt


def qwen_yaml_overrides(config, data_dir, ckpt, output_dir, seq_length=16):
    shape = {"seq_length": seq_length, "hidden_size": config.hidden_size, "num_layers": config.num_layers,
             "num_heads": config.num_heads, "n_kv_heads": config.n_kv_heads, "vocab_size": config.vocab_size,
             "intermediate_size": config.intermediate_size, "tie_word_embeddings": config.tie_word_embeddings}
    args = ["--register_path", "research/qwen2_5", "--config", YAMLS / "finetune_qwen2_5_0_5b_8k.yaml",
            "--run_mode", "finetune", "--train_data", data_dir, "--load_checkpoint", ckpt, "--auto_trans_ckpt", "True",
            "--device_target", "CPU", "--use_parallel", "False", "--output_dir", output_dir,
            "--runner_config.gradient_accumulation_steps", 1, "--runner_config.batch_size", 2,
            "--runner_config.epochs", 1, "--train_dataset.data_loader.shuffle", "False"]
    for key, value in shape.items():
        args += [f"--model.model_config.{key}", value]
    return args


def write_target_ids_records(folder, vocab_size, pad_id, rows=4, row_length=17, seed=0):
    """Records as research/qwen2/qwen2_preprocess.py writes them: target_ids = input_ids, attention_mask
    0 on the padding."""
    from mindspore.mindrecord import FileWriter
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for _ in range(rows):
        used = int(rng.integers(6, row_length))
        input_ids = np.full(row_length, pad_id, np.int32)
        input_ids[:used] = rng.integers(0, pad_id, used)
        records.append({"input_ids": input_ids, "target_ids": input_ids.copy(),
                        "attention_mask": (input_ids != pad_id).astype(np.int32)})
    writer = FileWriter(str(folder / "alpaca-messages.mindrecord"), shard_num=1, overwrite=True)
    writer.add_schema({name: {"type": "int32", "shape": [-1]} for name in records[0]})
    writer.write_raw_data(records)
    writer.commit()
    return records


def test_qwen2_5_runbook_on_mindformers_layout_gives_transformers_loss_over_the_attention_mask(
        qwen_model, tmp_path):
    import torch
    import transformers
    config, folder, vocab, merges, ckpt = qwen_model
    pad_id = config.vocab_size - 3
    records = write_target_ids_records(tmp_path / "data", config.vocab_size, pad_id)
    result = run_tool("run_mindformer.py", *qwen_yaml_overrides(config, tmp_path / "data", ckpt, tmp_path / "out"))
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-3000:]
    assert "register_path" in result.stdout and "auto_trans_ckpt" in result.stdout
    # The reference: transformers on the converted (bfloat16) weights, MindFormers' loss over the
    # first global batch: position t learns target_ids[t + 1] where attention_mask[t] is 1.
    model = transformers.AutoModelForCausalLM.from_pretrained(folder / "hf", dtype=torch.float32)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(param.to(torch.bfloat16).float())
        batch = records[:2]
        input_ids = torch.tensor(np.stack([r["input_ids"] for r in batch])).long()
        logits = model(input_ids[:, :-1]).logits
        targets = torch.tensor(np.stack([r["target_ids"] for r in batch]))[:, 1:].long()
        mask = torch.tensor(np.stack([r["attention_mask"] for r in batch]))[:, :-1].bool()
        loss = torch.nn.functional.cross_entropy(logits[mask], targets[mask]).item()
    assert abs(losses(tmp_path / "out")[0] - loss) <= 1e-5 * abs(loss)


def test_qwen2_5_runbook_preprocesses_vocab_and_merges_in_chatml_and_trains_on_our_labels(qwen_model, tmp_path):
    config, folder, vocab, merges, ckpt = qwen_model
    messages = [{"type": "chatml", "messages": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": f"Answer {i}."}]}
        for i in range(4)]
    data = tmp_path / "alpaca-data-messages.json"
    data.write_text("\n".join(json.dumps(m) for m in messages))
    out = tmp_path / "data" / "alpaca-messages.mindrecord"
    result = run_tool("tools/llama_preprocess.py", "--dataset_type", "qa", "--input_glob", data,
                      "--vocab_file", vocab, "--merges_file", merges, "--seq_length", 64, "--output_file", out,
                      "--no_progress")
    assert result.returncode == 0, result.stderr[-2000:]
    stats = json.loads(Path(str(out) + ".stats.json").read_text())
    assert stats["template"] == "hf" and stats["records_written"] == 4
    result = run_tool("run_mindformer.py", *qwen_yaml_overrides(config, tmp_path / "data", ckpt, tmp_path / "out",
                                                                seq_length=64))
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-3000:]
    assert ("train_dataset.input_columns input_ids, target_ids, attention_mask: the records in" in result.stdout
            and "trained on those (labels: the tokens they mark)" in result.stdout)
    assert len(losses(tmp_path / "out")) == 2


def test_preprocess_writes_mindformers_qwen2_layout_as_qwen2_preprocess_does(qwen_model, tmp_path):
    import mindspore.dataset as ds
    import transformers
    from mindsft.tokenizer.bpe_vocab_merges import CHATML_TEMPLATE
    config, folder, vocab, merges, ckpt = qwen_model
    conversations = [[{"role": "system", "content": "You are a helpful assistant."},
                      {"role": "user", "content": f"Give me {i} reasons."}, {"role": "assistant", "content": "No."}]
                     for i in range(3)]
    data = tmp_path / "messages.json"
    data.write_text("\n".join(json.dumps({"type": "chatml", "messages": m}) for m in conversations))
    out = tmp_path / "data" / "qwen.mindrecord"
    result = run_tool("tools/llama_preprocess.py", "--input_glob", data, "--vocab_file", vocab, "--merges_file",
                      merges, "--seq_length", 64, "--output_file", out, "--target_ids", "--no_progress")
    assert result.returncode == 0, result.stderr[-2000:]
    # The reference: transformers' Qwen2 tokenizer on the same files with MindFormers' default ChatML.
    reference = transformers.Qwen2Tokenizer.from_pretrained(str(vocab.parent))
    reference.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    pad_id = reference.convert_tokens_to_ids("<|endoftext|>")
    rows = list(ds.MindDataset([str(out)], shuffle=False).create_dict_iterator(num_epochs=1, output_numpy=True))
    assert sorted(rows[0]) == ["attention_mask", "input_ids", "target_ids"] and len(rows) == 3
    for row, messages in zip(rows, conversations):
        ids = reference.apply_chat_template(messages, chat_template=CHATML_TEMPLATE, tokenize=True)
        ids = list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
        want = np.array(ids + [pad_id] * (65 - len(ids)), np.int32)
        np.testing.assert_array_equal(row["input_ids"], want)
        np.testing.assert_array_equal(row["target_ids"], want)
        np.testing.assert_array_equal(row["attention_mask"], (want != pad_id).astype(np.int32))


# ---------------------------------------------------------------------------- the Llama 3.1 runbook

@pytest.fixture(scope="module")
def llama3_1_runbook(tmp_path_factory):
    """The runbook's first steps: alpaca_converter, llama_preprocess with Meta's tiktoken
    tokenizer.model, convert_weight --model llama --dtype bf16, on a tiny random Llama 3.1."""
    from mindsft.demo_model import write_tiny_hf_llama
    folder = tmp_path_factory.mktemp("llama3_1")
    tokens = tiny_tiktoken_bytes()
    tokenizer_model = write_tiktoken_file(folder / "tokenizer.model", tokens)
    config = write_tiny_hf_llama(folder / "hf", family="llama3", vocab_size=len(tokens) + 256, seq_length=160)
    alpaca = json.loads((ROOT / "mindsft/sample_data/alpaca_sample.json").read_text())[:8]
    (folder / "alpaca_data.json").write_text(json.dumps(alpaca))
    steps = [("tools/alpaca_converter.py", "--data_path", folder / "alpaca_data.json",
              "--output_path", folder / "alpaca-data-conversation.json"),
             ("tools/llama_preprocess.py", "--dataset_type", "qa", "--input_glob",
              folder / "alpaca-data-conversation.json", "--model_file", tokenizer_model, "--seq_length", 160,
              "--output_file", folder / "data" / "alpaca-fastchat160.mindrecord", "--no_progress"),
             ("tools/convert_weight.py", "--model", "llama", "--input_path", folder / "hf",
              "--output_path", folder / "llama3_1.ckpt", "--dtype", "bf16")]
    for step in steps:
        result = run_tool(*step)
        assert result.returncode == 0, f"{step[0]}: {result.stderr[-2000:]}"
    return config, folder


def run_llama3_1_finetune(config, folder, output_dir, log_dir, *extra):
    """run_mindformer.py as the runbook runs it, under the msrun launcher with 2 workers; the YAML's
    model shape overridden by the tiny model's."""
    shape = {"seq_length": 160, "hidden_size": config.hidden_size, "num_layers": config.num_layers,
             "num_heads": config.num_heads, "n_kv_heads": config.n_kv_heads, "vocab_size": config.vocab_size,
             "intermediate_size": config.intermediate_size}
    command = ["run_mindformer.py", "--register_path", "research/llama3_1",
               "--config", YAMLS / "finetune_llama3_1_8b.yaml", "--load_checkpoint", folder / "llama3_1.ckpt",
               "--auto_trans_ckpt", "True", "--use_parallel", "True", "--run_mode", "finetune",
               "--train_data", folder / "data", "--device_target", "CPU", "--output_dir", output_dir, *extra]
    for key, value in shape.items():
        command += [f"--model.model_config.{key}", value]
    from trainkit import free_port
    return subprocess.run(["bash", str(ROOT / "scripts" / "msrun_launcher.sh"), " ".join(map(str, command)), "2",
                           str(free_port()), str(log_dir), "True", "300"],
                          cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_llama3_1_runbook_under_msrun_with_semi_auto_parallel_equals_data_parallel(llama3_1_runbook, tmp_path):
    from trainkit import final_weights, worker_logs
    config, folder = llama3_1_runbook
    semi_auto = run_llama3_1_finetune(config, folder, tmp_path / "semi", tmp_path / "semi_logs")
    logs = worker_logs(tmp_path / "semi_logs")
    assert semi_auto.returncode == 0, semi_auto.stdout[-3000:] + logs
    for line in ("parallel.parallel_mode 1 with data parallelism only: runs as data parallel",
                 "parallel_config.data_parallel 8: 2 workers run, so data parallel is 2",
                 "compute_dtype bfloat16, param_init_type float16, embedding_init_type bfloat16: computed in float32",
                 "no effect here:"):
        assert line in logs, line
    data_parallel = run_llama3_1_finetune(config, folder, tmp_path / "dp", tmp_path / "dp_logs",
                                          "--parallel.parallel_mode", 0)
    assert data_parallel.returncode == 0, worker_logs(tmp_path / "dp_logs")
    assert len(losses(tmp_path / "semi")) == 8  # 8 records, batch 1 x 2 workers, the YAML's 2 epochs
    np.testing.assert_array_equal(losses(tmp_path / "semi"), losses(tmp_path / "dp"))
    semi_weights, dp_weights = final_weights(tmp_path / "semi", "llama3_1_8b"), final_weights(tmp_path / "dp", "llama3_1_8b")
    for name, value in semi_weights.items():
        np.testing.assert_array_equal(value, dp_weights[name], err_msg=name)


def test_auto_trans_ckpt_of_a_complete_checkpoint_is_said_and_of_a_sharded_one_refused(tmp_path):
    from mindsft.config import load_run_config
    from mindsft.errors import ConfigError
    overrides = {"context.device_target": "CPU", "auto_trans_ckpt": True}
    assert "auto_trans_ckpt" in load_run_config(YAMLS / "finetune_llama3_1_8b.yaml", overrides).no_effect
    with pytest.raises(ConfigError, match="sharded by a parallel strategy cannot be transformed here"):
        load_run_config(YAMLS / "finetune_llama3_1_8b.yaml", {**overrides, "src_strategy_path_or_dir": "strategy/"})


def test_predict_takes_the_tiktoken_tokenizer_model_as_processor_vocab_file(llama3_1_runbook, tmp_path):
    config, folder = llama3_1_runbook
    args = ["--config", YAMLS / "finetune_llama3_1_8b.yaml", "--run_mode", "predict", "--device_target", "CPU",
            "--use_parallel", "False", "--load_checkpoint", folder / "llama3_1.ckpt", "--output_dir", tmp_path,
            "--processor.tokenizer.vocab_file", folder / "tokenizer.model", "--predict_data", "Give three tips",
            "--max_new_tokens", 4, "--template", "vicuna_v1.1"]
    for key in ("hidden_size", "num_layers", "num_heads", "n_kv_heads", "vocab_size", "intermediate_size"):
        args += [f"--model.model_config.{key}", getattr(config, key)]
    result = run_tool("run_mindformer.py", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((tmp_path / "generated_predictions.jsonl").read_text().splitlines()[0])
    # The prompt is the vicuna text the tiktoken model encoded and decoded; the reply, of a random model,
    # is whatever its 4 tokens decode to.
    assert record["prompt"].endswith("USER: Give three tips ASSISTANT:") and isinstance(record["predict"], str)
