"""Streaming HuggingFace ⇄ MindSpore weight conversion (see convert.py)."""
from mindsft.convert.convert import (format_summary, hf_to_ms, model_config_path, ms_to_hf,  # noqa: F401
                                     read_model_config, write_model_config)
