"""handsoff: a few labeled images in, an unlimited labeled image corpus out (HandsOff, CVPR 2023)."""
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent

setup(
    name="handsoff",
    version="0.1.0",
    description="Turn fewer than 50 labeled images into an unlimited labeled corpus with a StyleGAN2 (HandsOff, CVPR 2023).",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8") if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.9",
    packages=find_packages(include=["handsoff", "handsoff.*", "stylegan_ops", "stylegan_ops.*"]),
    # The C++/CUDA sources are compiled on first use (ninja JIT), so they ship as package data.
    package_data={"stylegan_ops": ["csrc/*.cpp", "csrc/*.cu", "csrc/*.h", "csrc/*.cuh"]},
    install_requires=[
        "torch>=2.4",
        "numpy>=1.23",
        "safetensors>=0.4",
        "h5py>=3.8",
        "opencv-python-headless>=4.7",
        "scikit-learn>=1.2",
        "tqdm>=4.64",
        "ninja>=1.11",
        "pillow>=9.0",
        "lpips>=0.1.4",
    ],
    extras_require={"test": ["pytest>=7"]},
    entry_points={"console_scripts": ["handsoff=handsoff.cli:main"]},
)
