from setuptools import find_packages, setup

setup(
    name="mindsft",
    version="0.1.0",
    description="Supervised fine-tuning of Llama-family models in MindSpore",
    packages=find_packages(include=["mindsft", "mindsft.*"]),
    package_data={"mindsft": ["sample_data/*.json", "models/*.cc"]},
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
                 "trl==1.16.0"],  # preference-tuning parity (DPOTrainer, CPO/ORPO losses)
    },
)
