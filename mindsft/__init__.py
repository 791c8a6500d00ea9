"""mindsft: supervised fine-tuning of Llama-family models in MindSpore."""

__version__ = "0.1.0"
