"""Builds the C++ kernels ahead of time when torch is importable at build time.

`pip install --no-build-isolation .` (torch already installed) compiles rtdetrv2_kernels._C against that
torch and stamps it with the torch version. Under pip's default build isolation torch is absent here, so
only the Python package and the C++ sources are installed, and the kernels are compiled at first use
against whatever torch is installed then (rtdetrv2_kernels/_extension.py). A binary is never loaded
by a torch other than the one it was built against.
"""

import importlib.util
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent


def _build_config():
    spec = importlib.util.spec_from_file_location("_build_config", ROOT / "rtdetrv2_kernels" / "_build_config.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _extensions():
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        print(
            "rtdetrv2_kernels: torch is not importable in this build environment; the C++ kernels will be "
            "compiled at first use against the installed torch (use `pip install --no-build-isolation .` "
            "to build them now)"
        )
        return [], {}
    config = _build_config()

    class BuildExtensionWithStamp(BuildExtension):
        def build_extension(self, ext):
            super().build_extension(ext)
            built = Path(self.get_ext_fullpath(ext.name))
            stamp = built.parent / (ext.name.rsplit(".", 1)[-1] + config.STAMP_SUFFIX)
            stamp.write_text(config.torch_build_tag() + "\n")

    extensions = [
        CppExtension(
            f"rtdetrv2_kernels.{name}",
            sources=[f"csrc/{source}" for source in sources],
            include_dirs=[str(ROOT / "csrc")],
            extra_compile_args=config.CXX_FLAGS,
            extra_link_args=config.LINK_FLAGS,
        )
        for name, sources in config.LIBRARIES.items()
    ]
    return extensions, {"build_ext": BuildExtensionWithStamp.with_options(use_ninja=True)}


# The C++ sources ship inside the package (as rtdetrv2_kernels/csrc/...) so that they can be compiled at
# first use; each source folder is listed as a data-only package.
SOURCE_PACKAGES = ["rtdetrv2_kernels.csrc"] + sorted(
    "rtdetrv2_kernels.csrc." + ".".join(d.relative_to(ROOT / "csrc").parts)
    for d in (ROOT / "csrc").rglob("*")
    if d.is_dir()
)
ext_modules, cmdclass = _extensions()
setup(
    packages=["rtdetrv2_kernels", *SOURCE_PACKAGES],
    package_dir={"rtdetrv2_kernels.csrc": "csrc"},
    package_data={name: ["*.h", "*.cuh", "*.cpp", "*.cu"] for name in SOURCE_PACKAGES},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
