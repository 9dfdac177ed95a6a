from setuptools import find_packages, setup

with open("requirements.txt") as f:
    requirements = [line.strip() for line in f if line.strip() and not line.startswith("#")]

setup(
    name="ivfast",
    version="0.1.0",
    description="A performance-first training engine for InternVideo-Next video foundation models",
    packages=find_packages(include=["ivfast", "ivfast.*"]),
    python_requires=">=3.10",
    install_requires=requirements,
    extras_require={
        # GPU machines: FlashAttention and NVIDIA DALI (CUDA 13 build). Neither installs on a CPU machine.
        "gpu": ["flash-attn>=2.7"],
        # Tests: import contracts; transformers for the parity tests of the teacher and predictor
        # loaders (tests/models/test_transformers_parity.py, skipped without it). transformers pulls
        # no torchvision and keeps the installed torch. Keep in step with requirements-dev.txt.
        "test": ["import-linter==2.17", "transformers==5.23.0"],
    },
    entry_points={"console_scripts": ["ivfast-train=ivfast.train:main", "ivfast-export=ivfast.export:main",
                                        "ivfast-probe=ivfast.probes.cli:main", "ivfast-data=ivfast.data.cli:main",
                                        "ivfast-memory=ivfast.memory.cli:main"]},
)
