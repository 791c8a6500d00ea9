"""HuggingFace ⇄ MindSpore checkpoint conversion (streaming) and the weight-name table."""
from mindsft.convert.convert import (format_summary, hf_to_ms, llama_config_from_hf_json,  # noqa: F401
                                     llama_config_from_yaml, ms_to_hf)
