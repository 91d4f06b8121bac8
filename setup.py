from setuptools import find_packages, setup

setup(
    name="sae-kernels",
    version="0.1.0",
    description="Fast, exact TopK sparse autoencoders (the Llama Scope method) on fused Triton kernels",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["csrc_triton", "sae_kernels", "trainer", "trainer.*"]),
    package_data={"trainer.analyze": ["assets/*"]},  # the dashboard's CSS and JavaScript
    install_requires=[
        # Install torch first (`pip install torch==2.13.0`): a bare `torch` requirement on a machine
        # without it fetches the newest CUDA build. Any 2.x from 2.4 on works.
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux'",
        "numpy",
        "safetensors>=0.4",
        "transformers>=4.45",
        "datasets>=2.18",
        "huggingface_hub>=0.23",
        "tqdm",
        "matplotlib",  # suite.png, the suite's figure
        # the embedded default model is a GGUF file: transformers reads it with gguf + accelerate
        "gguf>=0.10",
        "accelerate>=0.30",
    ],
    extras_require={
        # The real peer packages the interop tests run against (tests/test_interop.py). sae-bench is
        # installed separately with --no-deps (its own pins pull a CUDA torch): see the README.
        "test": ["pytest>=7", "pytest-benchmark>=4", "sae-lens>=6", "eai-sparsify", "tabulate", "tensorboard"],
        "bench": ["pytest>=7", "pytest-benchmark>=4", "eai-sparsify"],
    },
    entry_points={"console_scripts": ["sae-train=trainer.run:main", "sae-analyze=trainer.analyze.cli:main",
                                      "sae-evaluate=trainer.evaluate.cli:main"]},
)
