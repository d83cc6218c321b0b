"""fastdrag: DragDiffusion point-based image editing, fast and deployable."""
from setuptools import setup

setup(
    name="fastdrag",
    version="0.1.0",
    description="DragDiffusion point-based image editing on Stable Diffusion 1.x and 2.x, fast and deployable",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["fastdrag", "fastdrag.toy", "fastdrag.kernels", "fastdrag.export"],
    package_dir={"fastdrag": "fastdrag", "fastdrag.kernels": "kernels", "fastdrag.export": "export"},
    package_data={"fastdrag": ["py.typed"], "fastdrag.toy": ["weights/*.safetensors", "weights/*.json"],
                  "fastdrag.export": ["manifest.schema.json"]},
    install_requires=[
        "torch>=2.10",
        "diffusers>=0.33",
        "transformers>=4.43",
        "peft>=0.15",
        "safetensors",
        "numpy",
        "pillow",
        "tqdm",
    ],
    extras_require={
        "gpu": ["triton>=3.0", "xformers>=0.0.28"],
        "export": ["onnx>=1.17", "onnxruntime>=1.19", "onnxscript", "jsonschema>=4.18"],
        "tensorrt": ["tensorrt>=10.0"],
        "test": ["pytest>=8", "ruff>=0.6", "vermin>=1.9", "mypy>=1.10", "pyright[nodejs]>=1.1.390", "pytest-benchmark>=4", "pytest-timeout>=2", "pytest-xdist>=3", "triton>=3.0", "onnx>=1.17", "onnxruntime>=1.19", "onnxscript", "jsonschema>=4.18"],
    },
    entry_points={"console_scripts": ["fastdrag = fastdrag.cli:main"]},
)
