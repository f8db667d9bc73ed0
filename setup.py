import re
from pathlib import Path

from setuptools import find_packages, setup

# The version lives in gwnet/_version.py alone (read as text: importing gwnet needs torch).
VERSION = re.search(r'__version__ = "([^"]+)"', Path("gwnet/_version.py").read_text()).group(1)

setup(
    name="gwnet",
    version=VERSION,
    description="Graph WaveNet (original and improved) for spatio-temporal traffic forecasting",
    long_description=Path("README.md").read_text(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.11",
    packages=find_packages(include=["gwnet", "gwnet.*"]),
    install_requires=[
        "torch>=2.2",
        "numpy>=1.24",
        "pandas>=2.0",
        "scipy>=1.10",
        "h5py>=3.8",
        "tables>=3.8",
        "tqdm>=4.60",
        "matplotlib>=3.7",
        "pyyaml>=6.0",
    ],
    extras_require={
        "parquet": ["pyarrow>=12"],
        # 8-bit AdamW (--optimizer adamw8bit); FSDP itself is part of torch. torchao releases
        # follow torch's: 0.18 is the one for torch 2.13.
        "scale": ["torchao>=0.18,<0.19"],
        # --log tensorboard: event files under RUN_DIR/tensorboard/
        "tensorboard": ["tensorboard>=2.14"],
        # graphs from torch_geometric.data.Data (gwnet.data.graph.graph_from_pyg); duck-typed,
        # so a PyG edge_index tensor works without it
        "pyg": ["torch_geometric>=2.4"],
        # gwnet-export --format onnx (torch's exporter writes through onnxscript; onnxruntime checks it)
        "export": ["onnxscript>=0.5", "onnxruntime>=1.20"],
        # gwnet-serve
        "serve": ["fastapi>=0.110", "uvicorn>=0.29"],
        "test": ["pytest>=7", "pyarrow>=12", "torchao>=0.18,<0.19", "tensorboard>=2.14", "torch_geometric>=2.4",
                 "onnxscript>=0.5", "onnxruntime>=1.20", "fastapi>=0.110", "uvicorn>=0.29", "httpx>=0.27"],
    },
    entry_points={
        "console_scripts": [
            "gwnet-train=gwnet.cli.train:main",
            "gwnet-predict=gwnet.cli.predict:main",
            "gwnet-data=gwnet.cli.data:main",
            "gwnet-export=gwnet.cli.export:main",
            "gwnet-serve=gwnet.cli.serve:main",
        ]
    },
)
