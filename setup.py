from setuptools import find_packages, setup

setup(
    name="clipzero",
    version="0.1.0",
    description="Config-free DeepSpeed ZeRO pretraining of data-efficient CLIP models",
    packages=find_packages(include=["engine", "engine.*", "kernels", "kernels.*"]),
    python_requires=">=3.10",
    install_requires=[
        # torch is pinned by the README's install line (a CPU/CUDA build of the user's choice).
        "torch>=2.4",
        "torchvision",
        "deepspeed>=0.16,<0.20",
        "timm>=1.0,<1.1",
        "transformers>=4.45,<5",
        "mosaicml-streaming>=0.11,<0.14",
        "nvidia-dali-cuda120>=1.40",
        "tensorboard>=2.15",
        "open_clip_torch>=2.24",  # ships the CLIP BPE vocabulary used offline
        "scikit-learn>=1.3",      # ships the digits images of the built-in dataset
        "tqdm",
    ],
    extras_require={"test": ["pytest>=8"]},
)
