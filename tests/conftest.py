"""Fixtures shared by the tests: where ../shared lives, and tiny real models built on the spot."""
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("MINDSFT_SHARED", ROOT.parent / "shared")) / "data"


def shared_file(relative):
    """Path to a file under ../shared/data, or skip the test saying what is missing."""
    path = SHARED_DATA / relative
    if not path.exists():
        pytest.skip(f"{path} is absent (../shared/data is optional)")
    return path


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory):
    """A random tiny Llama (GQA, 2 layers) in HuggingFace format with a trained tokenizer."""
    from mindsft.demo_model import write_tiny_hf_llama
    path = tmp_path_factory.mktemp("tiny") / "tiny-llama-hf"
    write_tiny_hf_llama(path)
    return path


@pytest.fixture(scope="session")
def bpe_dir(tmp_path_factory):
    """A small byte-level BPE HuggingFace folder (Llama 3-like: BOS, <|eot_id|>, two end ids)."""
    from tokenizer_helpers import write_bpe_tokenizer
    return Path(write_bpe_tokenizer(tmp_path_factory.mktemp("bpe") / "bpe", generation_eos=[2, 1]))
