from setuptools import find_packages, setup

setup(
    name="mindsft",
    version="0.1.0",
    description="Supervised fine-tuning of Llama-family models in MindSpore",
    packages=find_packages(include=["mindsft", "mindsft.*"]),
    package_data={"mindsft": ["sample_data/*.json", "*.cc", "board/page.html"]},
    python_requires=">=3.9",
    install_requires=[
        "mindspore==2.10.0",
        "numpy<2",  # MindSpore 2.10 crashes at its first op with numpy 2
        "sentencepiece>=0.2.0",
        "tokenizers>=0.19",  # HuggingFace tokenizer.json (Llama 3, Qwen, Mistral)
        "safetensors",
        "pyyaml",
        "tqdm",
        "jinja2",
        "matplotlib",  # the loss curve PNG at the end of a training run
        "jieba==0.42.1",  # word segmentation for ROUGE, as LLaMA-Factory scores
    ],
    extras_require={
        # The references our tests compare against; torch pinned to the CPU build.
        "test": ["pytest", "torch==2.13.0", "transformers==5.23.0", "peft==0.21.2",
                 "nltk==3.10.4", "rouge-chinese==1.0.3",
                 # The reference for dataset mixing and the validation split; pyarrow 25+ needs numpy 2.
                 "datasets==5.2.0", "pyarrow==24.0.0",
                 "bitsandbytes==0.50.2",  # QLoRA parity; its CPU backend is what quant.py matches
                 "tiktoken==0.14.0",  # the reference for Llama 3's tiktoken tokenizer.model
                 "openai==3.63.0", "pexpect==4.9.0",  # the server's tests speak through the official client; chat's through a pty
                 # The board's test drives Debian's chromium through its own chromedriver.
                 "selenium==4.51.0",
                 "trl==1.16.0"],  # preference-tuning parity (DPOTrainer, CPO/ORPO losses)
        # tools/serve.py: the OpenAI-compatible HTTP API.
        "serve": ["fastapi==0.165.0", "uvicorn==0.55.0", "sse-starlette==3.7.1"],
        # The web board (tools/board.py): one page served locally, nothing fetched at run time.
        "board": ["fastapi==0.165.0", "uvicorn==0.55.0"],
    },
)
