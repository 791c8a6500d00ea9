"""The file formats underneath the converter: `.ckpt` bytes as protobuf writes them, split and
CRC-trailed checkpoints, dtype casts as torch rounds them, shapes as the model holds them,
the command line, and streaming memory."""
import binascii
import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import mindspore as ms
from mindspore.train.checkpoint_pb2 import Checkpoint

from mindsft.convert import dtypes
from mindsft.convert.ckpt_format import CkptWriter, read_ckpt
from mindsft.convert.safetensors_format import write_safetensors
from mindsft.models.families import family_of, model_config_from_hf
from mindsft.models.llama import LlamaForCausalLM
from tests.conftest import ROOT


def test_ckpt_writer_bytes_equal_protobuf_serialisation(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {"a.weight": rng.standard_normal((7, 5)).astype(np.float32),
               "b.weight": rng.standard_normal(11).astype(np.float16)}
    reference = Checkpoint()
    with CkptWriter(tmp_path / "ours.ckpt") as writer:
        for name, array in tensors.items():
            writer.write(name, dtypes.canonical(array.dtype.name), array.shape, [array.reshape(-1)])
            value = reference.value.add()
            value.tag = name
            value.tensor.dims.extend(array.shape)
            value.tensor.tensor_type = dtypes.ckpt_code(dtypes.canonical(array.dtype.name))
            value.tensor.tensor_content = array.tobytes()
    # MindSpore's save_checkpoint(crc_check=True) trailer: "crc_num" + CRC-32 of the body, 10 bytes big-endian.
    body = reference.SerializeToString()
    assert (tmp_path / "ours.ckpt").read_bytes() == body + b"crc_num" + binascii.crc32(body).to_bytes(10, "big")
    loaded = ms.load_checkpoint(str(tmp_path / "ours.ckpt"), crc_check=True)
    np.testing.assert_array_equal(loaded["a.weight"].asnumpy(), tensors["a.weight"])


def test_split_tensors_join_in_mindspore_and_in_our_reader(tmp_path):
    array = np.arange(1000, dtype=np.float32).reshape(100, 10)
    bf16_bits = np.arange(60, dtype=np.uint16).reshape(6, 10) + 0x3F00
    with CkptWriter(tmp_path / "split.ckpt", chunk_bytes=1024) as writer:
        writer.write("w", "float32", array.shape, np.array_split(array.reshape(-1), 7))
        writer.write("h", "bfloat16", bf16_bits.shape, [bf16_bits.reshape(-1)])
    parsed = Checkpoint()
    parsed.ParseFromString((tmp_path / "split.ckpt").read_bytes()[:-17])  # less the checksum trailer
    assert [v.tag for v in parsed.value] == ["w"] * 4 + ["h"]
    loaded = ms.load_checkpoint(str(tmp_path / "split.ckpt"))
    np.testing.assert_array_equal(loaded["w"].asnumpy(), array)
    assert loaded["h"].dtype == ms.bfloat16
    tensors, _ = read_ckpt(tmp_path / "split.ckpt")
    np.testing.assert_array_equal(tensors["w"].to_numpy(), array)
    np.testing.assert_array_equal(tensors["h"].to_numpy(), bf16_bits)


def test_reads_what_mindspore_save_checkpoint_writes_with_crc(tmp_path):
    weight = np.random.default_rng(1).standard_normal((4, 3)).astype(np.float32)
    ms.save_checkpoint([{"name": "w", "data": ms.Tensor(weight)},
                        {"name": "b", "data": ms.Tensor(weight, ms.bfloat16)}],
                       str(tmp_path / "crc.ckpt"), crc_check=True, append_dict={"note": "text"})
    tensors, others = read_ckpt(tmp_path / "crc.ckpt")
    np.testing.assert_array_equal(tensors["w"].to_numpy(), weight)
    expected_bits = torch.from_numpy(weight).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(tensors["b"].to_numpy(), expected_bits)
    assert others == [("note", "str")]


def test_dtype_casts_round_as_torch_does():
    values = np.array([1.0, -2.5, 1 + 2**-8, 1 + 3 * 2**-8, 65504.0, 1e-8, 3.4e38, np.inf, -np.inf, np.nan,
                       *np.random.default_rng(2).standard_normal(1000)], dtype=np.float32)
    torch_values = torch.from_numpy(values)
    as_bf16 = dtypes.convert(values, "float32", "bfloat16")
    torch_bits = torch_values.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    # Any NaN bit pattern is a NaN (torch writes 0xFFFF here); every other value must match bit for bit.
    nan = np.isnan(values)
    np.testing.assert_array_equal(as_bf16[~nan], torch_bits[~nan])
    assert np.isnan(dtypes.convert(as_bf16[nan], "bfloat16", "float32")).all()
    np.testing.assert_array_equal(dtypes.convert(as_bf16, "bfloat16", "float32"),
                                  torch_values.to(torch.bfloat16).float().numpy())
    np.testing.assert_array_equal(dtypes.convert(as_bf16, "bfloat16", "float16"),
                                  torch_values.to(torch.bfloat16).to(torch.float16).numpy())
    as_fp16 = dtypes.convert(values, "float32", "float16")
    np.testing.assert_array_equal(dtypes.convert(as_fp16, "float16", "bfloat16"),
                                  torch.from_numpy(as_fp16).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16))


@pytest.mark.parametrize("tie", [False, True])
def test_expected_shapes_are_the_model_parameters(tie):
    hf_config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 50, "hidden_size": 24,
                 "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
                 "intermediate_size": 40, "tie_word_embeddings": tie}
    config = model_config_from_hf(hf_config)
    model_shapes = {p.name: tuple(p.shape) for p in LlamaForCausalLM(config).get_parameters()}
    # The family's shape table, which the converter checks files against without importing MindSpore.
    assert family_of(config).weight_shapes(config) == model_shapes


def load_cli():
    spec = importlib.util.spec_from_file_location("convert_weight", ROOT / "tools" / "convert_weight.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_command_line_both_directions(tiny_hf_dir, tmp_path, capsys):
    cli = load_cli()
    assert cli.main(["--model", "llama2", "--input_path", f"{tiny_hf_dir}/", "--output_path",
                     str(tmp_path / "m.ckpt"), "--dtype", "bf16", "--no_progress"]) == 0
    assert "21 tensors" in capsys.readouterr().out
    assert ms.load_checkpoint(str(tmp_path / "m.ckpt"))["lm_head.weight"].dtype == ms.bfloat16
    assert cli.main(["--model", "llama3", "--reversed", "--input_path", str(tmp_path / "m.ckpt"), "--output_path",
                     str(tmp_path / "hf"), "--hf_config", str(tiny_hf_dir / "config.json"), "--no_progress"]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert cli.main(["--input_path", str(tmp_path / "nowhere"), "--output_path", str(tmp_path / "x.ckpt")]) == 1
    assert "error: " in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--model", "gpt2"], ["--reversed"], ["--reversed", "--config", "a", "--hf_config", "b"]])
def test_command_line_refuses_bad_arguments(argv):
    with pytest.raises(SystemExit) as exit_info:
        load_cli().parse_args(["--input_path", "in", "--output_path", "out", *argv])
    assert exit_info.value.code == 2


@pytest.mark.slow
def test_peak_memory_stays_below_one_tensor(tmp_path):
    """A model whose embedding alone is 160 MB converts in a process that never holds it."""
    hidden, vocab = 1024, 40000
    hf_config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab,
                 "hidden_size": hidden, "num_hidden_layers": 1, "num_attention_heads": 8, "intermediate_size": 256}
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps(hf_config))
    rng = np.random.default_rng(0)
    entries = []
    config = model_config_from_hf(hf_config)
    for entry in family_of(config).weight_entries(config):
        name, shape = entry.hf_name, entry.hf_shape
        rows = [rng.standard_normal((min(4096, shape[0] - i),) + shape[1:]).astype(np.float32).reshape(-1)
                for i in range(0, shape[0], 4096)]
        entries.append((name, "float32", shape, rows))
    write_safetensors(tmp_path / "hf" / "model.safetensors", entries)
    largest = vocab * hidden * 4
    script = ("import json, sys; from mindsft.convert import hf_to_ms; "
              "s = hf_to_ms(sys.argv[1], sys.argv[2], progress=False); print(json.dumps(s))")
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path / "hf"), str(tmp_path / "m.ckpt")],
                            capture_output=True, text=True, cwd=ROOT, check=True)
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["bytes"] > 2 * largest
    assert summary["peak_rss_bytes"] < largest, summary
