"""longtrain: distributed long-sequence continued pretraining for open causal LMs.

Install torch first (the CPU build on CPU machines: ``pip install torch==2.13.0``);
an unpinned ``torch`` requirement can otherwise pull a multi-GB CUDA build.
"""
from setuptools import find_packages, setup

setup(
    name="longtrain",
    version="0.1.0",
    description="Distributed long-sequence continued pretraining with a staged RoPE schedule",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["longtrain", "longtrain.*", "data_prep", "data_prep.*"]),
    install_requires=[
        # Tested ranges (DESIGN.md section 3): torch 2.13, deepspeed 0.19.8, transformers 5.24,
        # datasets 5.2, sentencepiece 0.2.3.
        "torch>=2.4",
        "deepspeed>=0.19.8,<0.20",
        "transformers>=5.24,<6",
        "datasets>=4.0,<6",
        "sentencepiece>=0.2",
        "protobuf",
        "pyyaml>=6",
        "safetensors>=0.4",
        "accelerate",  # transformers' DeepSpeed integration (zero.Init loading under ZeRO-3)
        "numpy",
        "tqdm",
        "matplotlib",
        "pyarrow",
        "zstandard>=0.22",  # .zst inputs (SlimPajama, RedPajama); gzip, bz2 and xz are in the standard library
    ],
    extras_require={
        # flash-attn builds only where CUDA is present (DESIGN.md section 3).
        "flash": ["flash-attn>=2.6"],
        "dev": ["pytest>=8", "pytest-timeout"],
        "tensorboard": ["tensorboard"],
        # train.wandb and `longtrain eval --wandb` (tested with wandb 0.31, offline mode).
        "wandb": ["wandb>=0.19"],
    },
    entry_points={"console_scripts": ["longtrain=longtrain.cli:main"]},
)
