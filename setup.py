"""Build script: metadata lives in pyproject.toml; this file adds the optional native extension.

``neuslice._C`` is built from ``csrc/`` when torch is importable in the build environment
(use ``pip install --no-build-isolation``) and a C++ compiler works:

* CPU sources always; CUDA sources too (``-DWITH_CUDA``) when the installed torch is a CUDA
  build (``torch.version.cuda``) and nvcc is found (``CUDA_HOME``). Architectures come from
  ``TORCH_CUDA_ARCH_LIST``, by default those of 8.0;8.6;8.9;9.0 that the nvcc supports (the
  newest also as PTX).
* ``NEUSLICE_BUILD_EXT=0``: build nothing native. ``NEUSLICE_FORCE_EXT=1``: any native build
  failure is fatal. Otherwise a failure is reported and the pure-PyTorch package is installed.
* ``MAX_JOBS`` bounds parallel compilation (ninja, or our thread pool without ninja).
"""

import glob
import os
import subprocess
import sys

from setuptools import setup

CPU_SOURCES = ["csrc/ops.cpp", "csrc/block_gram.cpp"]
CUDA_SOURCES = ["csrc/cuda_ops.cpp", "csrc/block_gram_cuda.cu"]
DEFAULT_ARCHS = ("8.0", "8.6", "8.9", "9.0")

FORCE = os.environ.get("NEUSLICE_FORCE_EXT", "0") == "1"


def _log(msg):
    print(f"neuslice: {msg}", file=sys.stderr)


def _nvcc_archs(nvcc):
    """Compute capabilities (e.g. "8.6") the nvcc can compile for; empty if unknown."""
    try:
        out = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True,
                             timeout=60).stdout
    except Exception:
        return set()
    archs = set()
    for tok in out.split():
        if tok.startswith("compute_") and tok[8:].isdigit():
            v = tok[8:]
            archs.add(f"{v[:-1]}.{v[-1]}")
    return archs


def _cuda_toolkit():
    """Path of nvcc when a CUDA build is possible, else None (with the reason logged)."""
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    if torch.version.cuda is None:
        _log("installed torch has no CUDA; building the CPU extension only")
        return None
    nvcc = os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else None
    if not nvcc or not os.path.exists(nvcc):
        _log("CUDA toolkit (nvcc) not found, set CUDA_HOME; building the CPU extension only")
        return None
    return nvcc


def _jobs():
    jobs = os.environ.get("MAX_JOBS", "")
    return int(jobs) if jobs.isdigit() and int(jobs) > 0 else (os.cpu_count() or 1)


def _parallel_compile(compiler, jobs):
    """Let a setuptools compiler build an extension's sources in parallel (no ninja)."""
    if jobs <= 1:
        return
    from concurrent.futures import ThreadPoolExecutor

    def compile(sources, output_dir=None, macros=None, include_dirs=None, debug=0,
                extra_preargs=None, extra_postargs=None, depends=None):
        macros, objects, extra_postargs, pp_opts, build = compiler._setup_compile(
            output_dir, macros, include_dirs, sources, depends, extra_postargs)
        cc_args = compiler._get_cc_args(pp_opts, debug, extra_preargs)

        def one(obj):
            src, ext = build[obj]
            compiler._compile(obj, src, ext, cc_args, extra_postargs, pp_opts)

        with ThreadPoolExecutor(min(jobs, len(objects) or 1)) as pool:
            list(pool.map(one, [o for o in objects if o in build]))
        return objects

    compiler.compile = compile


def _extensions():
    if os.environ.get("NEUSLICE_BUILD_EXT", "1") == "0":
        _log("NEUSLICE_BUILD_EXT=0, building no native extension")
        stale = glob.glob(os.path.join("neuslice", "_C*.so"))
        if stale:
            _log(f"note: {stale[0]} from an earlier in-place build is still there and would be "
                 "imported; delete it for a pure-PyTorch install")
        return [], {}
    if not all(os.path.exists(s) for s in CPU_SOURCES):
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except Exception as exc:  # torch not importable (e.g. isolated build)
        if FORCE:
            raise
        _log(f"no native extension ({exc}); pure PyTorch only")
        return [], {}

    cxx = ["-O3", "-g0"]  # no debug info: halves compile time (Python's CFLAGS carry -g)
    link = []
    if sys.platform.startswith("linux"):
        cxx.append("-fopenmp")  # at::parallel_for is serial without it
        link.append("-fopenmp")
    nvcc = _cuda_toolkit() if all(os.path.exists(s) for s in CUDA_SOURCES) else None
    cpu_ext = CppExtension("neuslice._C", CPU_SOURCES, extra_compile_args=cxx,
                           extra_link_args=link)
    if nvcc is None:
        ext = cpu_ext
    else:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            supported = _nvcc_archs(nvcc)
            archs = [a for a in DEFAULT_ARCHS if a in supported or not supported]
            if not archs:
                raise RuntimeError(f"{nvcc} supports none of {DEFAULT_ARCHS}; "
                                   "set TORCH_CUDA_ARCH_LIST")
            archs[-1] += "+PTX"
            os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(archs)
        _log(f"building CUDA kernels for TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}")
        ext = CUDAExtension("neuslice._C", CPU_SOURCES + CUDA_SOURCES,
                            define_macros=[("WITH_CUDA", None)],
                            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-lineinfo"]},
                            extra_link_args=link)

    jobs = _jobs()

    class Build(BuildExtension):
        def run(self):
            # Failing here (not around setup()) keeps PEP 517 editable/wheel builds intact.
            inplace = self.inplace  # setuptools' run() clears it until it has succeeded
            try:
                super().run()
            except Exception as exc:
                if FORCE:
                    raise
                self.inplace = inplace
                if self.extensions and self.extensions[0] is not cpu_ext:
                    # e.g. nvcc found but the CUDA headers are not: the C++ CPU code still helps
                    _log(f"CUDA build failed ({type(exc).__name__}: {exc}); building the CPU "
                         "extension only")
                    failed = self.extensions[0]
                    for key, value in vars(failed).items():  # what finalize_options() set
                        if key.startswith("_") and not hasattr(cpu_ext, key):
                            setattr(cpu_ext, key, value)
                    self.extensions = [cpu_ext]
                    self.compiler = None  # run() makes a fresh one from the name (None)
                    try:
                        super().run()
                        return
                    except Exception as exc2:
                        exc = exc2
                _log(f"native build failed ({type(exc).__name__}: {exc}); installing the pure "
                     "PyTorch package (NEUSLICE_FORCE_EXT=1 makes this fatal)")
                self._drop_stale(self.extensions)
                self.extensions = []  # nothing to copy or to list as output

        def _drop_stale(self, exts):
            """An older build's library would otherwise be packaged or imported instead."""
            build_py = self.get_finalized_command("build_py")
            for ext in exts:
                fname = self.get_ext_filename(ext.name)
                pkg = ext.name.rpartition(".")[0]
                in_tree = os.path.join(build_py.get_package_dir(pkg), os.path.basename(fname))
                for path in (os.path.join(self.build_lib, fname), in_tree):
                    if os.path.exists(path):
                        _log(f"removing stale {path}")
                        os.remove(path)

        def build_extensions(self):
            # torch's non-ninja compile swaps the compiler executable for .cu files, which is
            # not thread-safe: only pure C++ builds get the thread pool.
            cuda = any(s.endswith(".cu") for e in self.extensions for s in e.sources)
            if not self.use_ninja and not cuda:
                _parallel_compile(self.compiler, jobs)
            super().build_extensions()

    return [ext], {"build_ext": Build.with_options(no_python_abi_suffix=True)}


try:
    ext_modules, cmdclass = _extensions()
except Exception as exc:
    if FORCE:
        raise
    _log(f"native extension not configured ({exc}); pure PyTorch only")
    ext_modules, cmdclass = [], {}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
