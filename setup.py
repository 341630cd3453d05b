"""fastkd: a fast knowledge-distillation trainer for image classification.

`kernels/` and `pipelines/` are top-level folders in the repository but install under the
`fastkd` namespace (`fastkd.kernels`, `fastkd.pipelines`), so nothing with a generic name lands
in site-packages.
"""
from setuptools import setup

VERSION = "0.1.0"

setup(
    name="fastkd",
    version=VERSION,
    description="Knowledge distillation for image classification: every method, fast",
    python_requires=">=3.10",
    packages=["fastkd", "fastkd.cache", "fastkd.distillers", "fastkd.kernels", "fastkd.pipelines",
              "fastkd.bench"],
    package_dir={"fastkd": "fastkd", "fastkd.kernels": "kernels", "fastkd.pipelines": "pipelines",
                 "fastkd.bench": "bench"},
    install_requires=[
        # torch from the index, unpinned: an exact CPU pin has no matching torchvision
        "torch>=2.4",
        "timm>=1.0",
        "pyyaml",
        "nvidia-dali-cuda120",
        "safetensors",
        "tensorboard",
        "tqdm",
        "scikit-learn",  # the demo's digits and the loader bench's photographs
        "scikit-image",  # more bundled photographs for the loader bench
        "matplotlib",    # the benchmark charts
    ],
    extras_require={"test": ["pytest>=7", "scipy"]},
    entry_points={"console_scripts": ["fastkd = fastkd.cli:main"]},
)
