"""Builds the C++ kernels ahead of time when torch is importable at build time.

`pip install --no-build-isolation .` (torch already installed) compiles rtdetrv2_kernels._C (CPU) and,
where an nvcc of torch's CUDA major version and a CUDA build of torch are present (otherwise only the CUDA
library is skipped, saying why), rtdetrv2_kernels._C_cuda, for TORCH_CUDA_ARCH_LIST
(default 7.5;8.0;8.6;8.9;9.0+PTX, no GPU needed), against that torch, and stamps each with the torch version. Under pip's default build isolation torch is absent here, so
only the Python package and the C++ sources are installed, and the kernels are compiled at first use
against whatever torch is installed then (rtdetrv2_kernels/_extension.py). A binary is never loaded
by a torch other than the one it was built against.
"""

import copy
import importlib.util
import os
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent


def _build_config():
    spec = importlib.util.spec_from_file_location("_build_config", ROOT / "rtdetrv2_kernels" / "_build_config.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _extensions():
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print(
            "rtdetrv2_kernels: torch is not importable in this build environment; the C++ kernels will be "
            "compiled at first use against the installed torch (use `pip install --no-build-isolation .` "
            "to build them now)"
        )
        return [], {}
    config = _build_config()

    class BuildExtensionWithStamp(BuildExtension):
        @staticmethod
        def write_stamp(package_dir, ext):
            name = ext.name.rsplit(".", 1)[-1]
            (Path(package_dir) / (name + config.STAMP_SUFFIX)).write_text(config.torch_build_tag() + "\n")
            if config.is_cuda_library(name):  # which GPUs it can run on (backend selection checks)
                (Path(package_dir) / (name + config.ARCHS_SUFFIX)).write_text(os.environ["TORCH_CUDA_ARCH_LIST"] + "\n")

        def finalize_options(self):
            super().finalize_options()
            # The CPU and the CUDA library compile at the same time (minutes each, mostly one compiler process).
            if self.parallel is None:
                self.parallel = True

        def build_extension(self, ext):
            # Each library in a build folder of its own: torch writes one build.ninja per folder.
            own_folder = copy.copy(self)
            own_folder.build_temp = os.path.join(self.build_temp, ext.name)
            super(BuildExtensionWithStamp, own_folder).build_extension(ext)
            self.write_stamp(Path(self.get_ext_fullpath(ext.name)).parent, ext)

        def copy_extensions_to_source(self):  # editable installs (`pip install -e .`) load from the checkout
            super().copy_extensions_to_source()
            package_dir = self.get_finalized_command("build_py").get_package_dir("rtdetrv2_kernels")
            for ext in self.extensions:
                self.write_stamp(package_dir, ext)

    cuda_reason = config.cuda_unavailable_reason()
    extensions = []
    for name, sources in config.LIBRARIES.items():
        kwargs = dict(
            sources=[f"csrc/{source}" for source in sources],
            include_dirs=[str(ROOT / "csrc")],
            extra_compile_args=config.CXX_FLAGS,
            extra_link_args=config.LINK_FLAGS,
        )
        if not config.is_cuda_library(name):
            extensions.append(CppExtension(f"rtdetrv2_kernels.{name}", **kwargs))
        elif cuda_reason:
            print(f"rtdetrv2_kernels: not building the CUDA kernels: {cuda_reason}")
        else:
            # Without a GPU to detect, torch would refuse to guess the architectures.
            os.environ.setdefault("TORCH_CUDA_ARCH_LIST", config.DEFAULT_CUDA_ARCHS)
            kwargs["include_dirs"] += config.cuda_include_dirs()
            kwargs["extra_compile_args"] = {"cxx": config.CXX_FLAGS, "nvcc": config.NVCC_FLAGS}
            extensions.append(CUDAExtension(f"rtdetrv2_kernels.{name}", **kwargs))
    return extensions, {"build_ext": BuildExtensionWithStamp.with_options(use_ninja=True)}


# The C++ sources ship inside the package (as rtdetrv2_kernels/csrc/...) so that they can be compiled at
# first use; each source folder is listed as a data-only package.
SOURCE_PACKAGES = ["rtdetrv2_kernels.csrc"] + sorted(
    "rtdetrv2_kernels.csrc." + ".".join(d.relative_to(ROOT / "csrc").parts)
    for d in (ROOT / "csrc").rglob("*")
    if d.is_dir()
)
HUB_LAYER_PACKAGES = ["rtdetrv2_kernels.integrations.kernels_hub_layer",
                      "rtdetrv2_kernels.integrations.kernels_hub_layer.build"]
ext_modules, cmdclass = _extensions()
setup(
    packages=[*find_packages(include=["rtdetrv2_kernels", "rtdetrv2_kernels.*", "python_model"]), *SOURCE_PACKAGES,
              *HUB_LAYER_PACKAGES],
    package_dir={"rtdetrv2_kernels.csrc": "csrc"},
    package_data={
        **{name: ["*.h", "*.cuh", "*.cpp", "*.cu"] for name in SOURCE_PACKAGES},
        # The Hugging Face kernels layer repository (integrations/kernels_hub.py): data, in data-only packages.
        HUB_LAYER_PACKAGES[-1]: ["torch-universal/*"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
