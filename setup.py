import os

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def requirements(name: str) -> list[str]:
    """The pinned lines of a requirements file (comments and blank lines dropped)."""
    with open(os.path.join(HERE, name)) as f:
        return [line.split("#")[0].strip() for line in f if line.split("#")[0].strip()]


setup(
    name="ivfast",
    version="0.1.0",
    description="A performance-first training engine for InternVideo-Next video foundation models",
    packages=find_packages(include=["ivfast", "ivfast.*"]),
    # The paper's configs ship with the package (ivfast/configs; the repository's configs/ links
    # there) so that every CLI finds them by name from any directory (ivfast.config.resolve_config_path).
    package_data={"ivfast": ["configs/*.yaml", "configs/probes/*.yaml"]},
    python_requires=">=3.10",
    install_requires=requirements("requirements.txt"),
    extras_require={
        # GPU machines: FlashAttention and NVIDIA DALI (CUDA 13 build, ~590 MB; data.backend dali).
        # Neither is needed on a CPU machine; without DALI the PyAV backend reads the videos.
        "gpu": ["flash-attn>=2.7", "nvidia-dali-cuda130==2.4.0"],
        # Loggers (train.loggers), imported only when named.
        "tensorboard": ["tensorboard==2.21.0"],
        "wandb": ["wandb==0.31.0"],
        "fsspec": ["fsspec==2026.9.0"],  # URLs (s3://, gs://, memory://) for lists, videos and shards
        # What `make test` installs: pytest, pytest-benchmark, import-linter, transformers
        # (the one list is requirements-dev.txt).
        "test": requirements("requirements-dev.txt"),
    },
    entry_points={"console_scripts": ["ivfast-train=ivfast.train:main", "ivfast-export=ivfast.export:main",
                                        "ivfast-probe=ivfast.probes.cli:main", "ivfast-data=ivfast.data.cli:main",
                                        "ivfast-memory=ivfast.memory.cli:main", "ivfast-plot=ivfast.plot:main",
                                        "ivfast-extract=ivfast.extract:main"]},
)
