"""ov2_megatron: OpenVision 2 (captioning-only vision-encoder pretraining) on megatron-core.

Supported: Python 3.10-3.13, torch >= 2.4 and the two megatron-core releases the test suite
proves: 0.16.1 on Python < 3.12 (its newest release there) and 0.19.2 on Python >= 3.12 (the
line NGC PyTorch containers resolve to; `make test` runs the suite on both). Transformer Engine and Apex are optional and imported
lazily (GPU containers bring them). DALI comes from the container on GPU machines and from
the `cpu` extra elsewhere; the pinned CPU environment is `requirements-cpu.txt`.
"""

from setuptools import find_packages, setup

setup(
    name="ov2_megatron",
    version="0.1.0",
    description="OpenVision 2 generative vision-encoder pretraining on megatron-core",
    python_requires=">=3.10",
    packages=find_packages(include=["ov2_megatron", "ov2_megatron.*", "kernels", "kernels.*"]),
    install_requires=[
        "torch>=2.4",
        "megatron-core==0.16.1; python_version < '3.12'",  # requirements-cpu.txt
        "megatron-core==0.19.2; python_version >= '3.12'",  # requirements-py312.txt, Dockerfile
        "numpy>=1.24",
        "pillow>=10",
        "psutil>=5.9",  # megatron-core's dist_checkpointing.save needs it but does not declare it
        "sentencepiece>=0.2",
        "tensorboard>=2.15",
        "safetensors>=0.4",  # conversion tools and feature files (tools/convert_checkpoint.py)
    ],
    extras_require={
        # NGC containers ship DALI for their CUDA; on plain machines take the CUDA 13 wheel,
        # which also runs CPU pipelines without a GPU.
        "cpu": ["nvidia-dali-cuda130>=2.4"],
        "test": ["pytest>=8", "pytest-timeout>=2.3", "pyarrow>=15"],
    },
    entry_points={"console_scripts": ["ov2-train=ov2_megatron.train:main"]},
)
