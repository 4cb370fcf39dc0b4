from setuptools import find_packages, setup

setup(
    name="clipzero",
    version="0.1.0",
    description="Config-free DeepSpeed ZeRO pretraining of data-efficient CLIP models",
    packages=find_packages(include=["engine", "engine.*", "kernels", "kernels.*"]),
    python_requires=">=3.10",
    # Ranges: from the release CI (and the GPU runs under benchmarks/results/) ran, to before
    # the next release likely to break us. .ci/run prints what it resolved; the README says
    # how to try newer releases.
    install_requires=[
        # Left wide so that a torch the user installed first (a CUDA build of their choice) is
        # kept; run here: 2.14 on the CPU, 2.11 and 2.14 on CUDA.
        "torch>=2.4",
        "torchvision",
        "deepspeed>=0.19,<0.20",  # engine/dist.py knows 0.19's CPU shared-memory file names
        "timm>=1.0.31,<1.1",      # CLIP's own towers by name arrived during 1.0.x
        "transformers>=4.57,<5",
        "mosaicml-streaming>=0.13,<0.14",
        "nvidia-dali-cuda120>=2.4,<3",
        "tensorboard>=2.15",
        "open_clip_torch>=3.3,<4",  # ships the CLIP BPE vocabulary used offline
        "scikit-learn>=1.3,<2",     # the digits of the built-in dataset; the probe and VOC07 SVM classifiers
        "tqdm",
        "pyarrow>=14",              # the converter reads parquet (img2dataset, Hugging Face datasets)
    ],
    # wandb: --wandb PROJECT logs to Weights & Biases (pip install 'clipzero[wandb]'); the tests
    # run it offline. moto's standalone server is the S3-API endpoint the remote-data tests start
    # on this machine.
    extras_require={"wandb": ["wandb>=0.31,<1"],
                    "test": ["pytest>=9.0,<10", "psutil", "moto[server]>=5,<6", "wandb>=0.31,<1"]},
)
