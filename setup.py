"""Build and install lmkit. The C++ engine (lmkit._turbo) is built by CMake against the installed torch.

Install without build isolation so the extension builds against the torch already installed:
    pip install --no-build-isolation -e .
"""

import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    """Configure and build CMakeLists.txt; the module lands where setuptools expects it."""

    def build_extension(self, ext: Extension) -> None:
        import torch  # the installed torch: the extension links against it

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(os.environ.get("LMKIT_BUILD_DIR", ROOT / "build" / "cmake"))
        build_dir.mkdir(parents=True, exist_ok=True)
        cfg = os.environ.get("LMKIT_BUILD_TYPE", "Release")
        args = [
            f"-DCMAKE_BUILD_TYPE={cfg}",
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DTURBO_OUTPUT_DIR={out_dir}",
        ]
        if os.environ.get("LMKIT_CUDA", "auto") == "0":
            args.append("-DTURBO_CUDA=OFF")
        if os.environ.get("LMKIT_CUDA_ARCH"):  # e.g. "90a" (H100/H200); default: the visible GPU ("native")
            args.append(f"-DCMAKE_CUDA_ARCHITECTURES={os.environ['LMKIT_CUDA_ARCH']}")
        subprocess.check_call(["cmake", str(ROOT), *args], cwd=build_dir)
        jobs = os.environ.get("LMKIT_BUILD_JOBS", str(os.cpu_count() or 2))
        subprocess.check_call(["cmake", "--build", ".", "--config", cfg, "-j", jobs], cwd=build_dir)


ext_modules = [CMakeExtension("lmkit._turbo")] if (ROOT / "CMakeLists.txt").exists() else []

setup(
    name="lmkit",
    version="0.1.0",
    description="A toolkit for deploying large language models: two engines, an OpenAI server, quantization.",
    packages=find_packages(include=["lmkit", "lmkit.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "numpy",
        "transformers>=4.46",
        "gguf>=0.10",
        "safetensors",
        "accelerate",
        "sentencepiece",
        "fastapi",
        "uvicorn",
        "httpx",
        "prometheus-client",
        "pybind11",
    ],
    extras_require={
        "serve": ["gradio", "openai"],
        "test": ["pytest", "pytest-asyncio", "openai", "ruff"],
    },
    ext_modules=ext_modules,
    cmdclass={"build_ext": CMakeBuild},
    entry_points={"console_scripts": ["lmkit = lmkit.cli.main:main"]},
    zip_safe=False,
)
