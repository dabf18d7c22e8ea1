"""Build script: metadata lives in pyproject.toml; this file adds the optional native extension.

The extension ``neuslice._C`` is built from ``csrc/`` only when sources are present, torch is
importable in the build environment and ``NEUSLICE_BUILD_EXT`` is not ``0``. Any build failure
is reported and the pure-PyTorch package is installed instead: the extension never makes an
install fail. Use ``pip install --no-build-isolation`` so the build sees the installed torch.
"""

import glob
import os
import sys

from setuptools import setup


def _extensions():
    if os.environ.get("NEUSLICE_BUILD_EXT", "1") == "0":
        print("neuslice: NEUSLICE_BUILD_EXT=0, building no native extension", file=sys.stderr)
        return [], {}
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if not sources:
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except Exception as exc:  # torch not importable in an isolated build
        print(f"neuslice: no native extension ({exc}); pure PyTorch only", file=sys.stderr)
        return [], {}
    ext = CppExtension("neuslice._C", sources, extra_compile_args=["-O3"])
    return [ext], {"build_ext": BuildExtension.with_options(no_python_abi_suffix=True)}


ext_modules, cmdclass = _extensions()
try:
    setup(ext_modules=ext_modules, cmdclass=cmdclass)
except SystemExit:
    raise
except Exception as exc:
    if not ext_modules:
        raise
    print(f"neuslice: native build failed ({exc}); installing without it", file=sys.stderr)
    setup()
