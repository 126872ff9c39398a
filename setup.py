"""Build hyforget_fast. CMakeLists.txt is the one build definition; this file drives it.

Environment:
  HYFORGET_NO_CUDA=1        skip the CUDA kernels even when nvcc is found
  HYFORGET_CUDA_ARCHS=90    CUDA architectures (default "80;90")
  CUDA_HOME                 toolkit root; its bin/nvcc is used when set
  HYFORGET_BUILD_DIR        persistent CMake build folder (default build/cmake), for fast rebuilds
"""
import os
import shutil
import subprocess
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))


def _find_nvcc():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        build_dir = os.environ.get("HYFORGET_BUILD_DIR") or os.path.join(ROOT, "build", "cmake")
        os.makedirs(build_dir, exist_ok=True)
        args = [f"-DPython_EXECUTABLE={sys.executable}", "-DCMAKE_BUILD_TYPE=Release"]
        nvcc = None if os.environ.get("HYFORGET_NO_CUDA") == "1" else _find_nvcc()
        if nvcc:
            real = os.path.realpath(nvcc)
            # The nvcc on PATH may be a wrapper script; ask it for its real toolkit root.
            try:
                with open(nvcc, "rb") as f:
                    head = f.read(4096).decode("utf-8", "replace")
                for tok in head.split():
                    if tok.endswith("/bin/nvcc") and os.path.exists(tok):
                        real = tok
            except OSError:
                pass
            args += [f"-DCMAKE_CUDA_COMPILER={real}", "-DHYFORGET_WITH_CUDA=ON",
                     f"-DCUDAToolkit_ROOT={os.path.dirname(os.path.dirname(real))}",
                     f"-DHYFORGET_CUDA_ARCHS={os.environ.get('HYFORGET_CUDA_ARCHS', '80;90')}"]
        else:
            args += ["-DHYFORGET_WITH_CUDA=OFF"]
        subprocess.check_call(["cmake", "-S", ROOT, "-B", build_dir, "-G", "Ninja", *args])
        jobs = str(max(1, os.cpu_count() or 1))
        subprocess.check_call(["cmake", "--build", build_dir, "--parallel", jobs])
        target = self.get_ext_fullpath(ext.name)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copyfile(os.path.join(build_dir, "libhyforget_C.so"), target)


setup(
    name="hyforget_fast",
    version="0.1.0",
    description="Machine unlearning with diffusion hypernetworks: fused kernels and pipeline",
    python_requires=">=3.10",
    packages=["hyforget_fast", "hyforget_fast.ops", "hyforget_fast.collection", "hyforget_fast.hypernet",
              "hyforget_fast.unlearn", "hyforget_fast.kernels"],
    package_dir={"hyforget_fast": "hyforget_fast", "hyforget_fast.kernels": "kernels"},
    # shipped pretrained hypernetworks: weights, model cards, DiHyFo-1 starting classifiers
    package_data={"hyforget_fast": ["pretrained/*/*.json", "pretrained/*/*.safetensors", "pretrained/README.md"]},
    ext_modules=[Extension("hyforget_fast._C", sources=[])],
    cmdclass={"build_ext": CMakeBuild},
    install_requires=["torch>=2.4", "numpy", "triton; platform_system=='Linux'", "mlxtend", "scikit-learn",
                      "matplotlib", "tqdm", "tensorboard", "safetensors"],
    extras_require={"test": ["pytest", "hypothesis", "torchvision", "pybind11", "ninja", "cmake"]},
    entry_points={"console_scripts": ["hyforget=hyforget_fast.cli:main"]},
)
