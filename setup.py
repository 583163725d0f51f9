"""Builds fastconv._C: every kernel source once per ISA, linked into one module.

Kernel sources (csrc/<algorithm>/*.cpp) are compiled three times, with -DFASTCONV_ISA_<NAME>
and that ISA's -m flags, into separate object directories; the bindings and shared code are
compiled once for the baseline ISA and pick a kernel table at run time.

FASTCONV_PORTABLE=1 builds the portable (scalar-only) variant, as on a non-x86 machine.
FASTCONV_SANITIZE=1 builds with -fsanitize=address,undefined (see README: "Sanitizers").
"""
import glob
import os
import platform
from concurrent.futures import ThreadPoolExecutor

from Cython.Build import cythonize
from pybind11.setup_helpers import Pybind11Extension
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

# The x86 ISA variants are built only on x86-64; elsewhere (or with FASTCONV_PORTABLE=1, which
# tests use to exercise this path here) the portable scalar build is the only one.
PORTABLE = (platform.machine().lower() not in ("x86_64", "amd64")
            or os.environ.get("FASTCONV_PORTABLE", "") not in ("", "0"))
X86_ISA_FLAGS = {
    "scalar": [],
    "avx2": ["-mavx2", "-mfma", "-Wno-maybe-uninitialized"],  # same g++ 12 issue, in its gathers
    # g++ 12's avx512fintrin.h builds unmasked intrinsics on `__m512 __Y = __Y;`, which -Wall
    # reports as uninitialized (fixed in later GCC). The same sources are compiled warning-clean
    # with these warnings on for the other two ISAs.
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma",
               "-Wno-uninitialized", "-Wno-maybe-uninitialized"],
}
ISA_FLAGS = {"scalar": []} if PORTABLE else X86_ISA_FLAGS
ISA_MACROS = [] if PORTABLE else [("FASTCONV_X86_ISAS", "1")]
KERNEL_SOURCES = sorted(
    p for p in glob.glob("csrc/*/*.cpp") if not p.startswith(os.path.join("csrc", "common"))
)
COMMON_SOURCES = ["csrc/bindings.cpp"] + sorted(glob.glob("csrc/common/*.cpp"))

SANITIZE = os.environ.get("FASTCONV_SANITIZE", "") not in ("", "0")
COMPILE_ARGS = ["-O3", "-fopenmp", "-std=c++17", "-fno-math-errno"]
LINK_ARGS = ["-fopenmp"]
if SANITIZE:
    COMPILE_ARGS = ["-O1", "-g", "-fno-omit-frame-pointer", "-fopenmp", "-std=c++17",
                    "-fsanitize=address,undefined", "-fno-sanitize-recover=undefined"]
    LINK_ARGS = ["-fopenmp", "-fsanitize=address,undefined"]


class BuildPerIsa(build_ext):
    """Compiles KERNEL_SOURCES once per ISA and links the objects into the extension.

    The (source, ISA) pairs compile in parallel, one compiler process per CPU
    (FASTCONV_BUILD_JOBS overrides): the build is ~60 objects, serial it took 2.5 min here."""

    def build_extension(self, ext):
        if ext.name != "fastconv._C":
            return super().build_extension(ext)

        def compile_one(job):
            isa, source = job
            return self.compiler.compile(
                [source],
                output_dir=os.path.join(self.build_temp, "isa_" + isa),
                macros=[("FASTCONV_ISA_" + isa.upper(), "1")] + ISA_MACROS,
                include_dirs=["csrc"],
                extra_postargs=COMPILE_ARGS + ISA_FLAGS[isa],
                depends=ext.depends,
            )

        jobs = [(isa, source) for isa in ISA_FLAGS for source in KERNEL_SOURCES]
        workers = int(os.environ.get("FASTCONV_BUILD_JOBS", "0")) or os.cpu_count() or 1
        with ThreadPoolExecutor(max_workers=workers) as pool:
            ext.extra_objects = [obj for objs in pool.map(compile_one, jobs) for obj in objs]
        super().build_extension(ext)


ext = Pybind11Extension(
    "fastconv._C",
    COMMON_SOURCES,
    include_dirs=["csrc"],
    define_macros=ISA_MACROS,
    extra_compile_args=COMPILE_ARGS,
    extra_link_args=LINK_ARGS,
    cxx_std=17,
    # The kernel sources are compiled by BuildPerIsa, not listed as the extension's sources:
    # naming them here makes an edit to one of them relink the extension.
    depends=sorted(glob.glob("csrc/**/*.h", recursive=True)) + KERNEL_SOURCES,
)

# The `naive` strategy (fastconv/_naive.pyx): the definition's plain loops, the benchmarks'
# baseline. Built for the baseline ISA only: it has no vector code of its own to pick.
naive = Extension("fastconv._naive", ["fastconv/_naive.pyx"],
                  extra_compile_args=[a for a in COMPILE_ARGS if not a.startswith("-std=")],
                  extra_link_args=LINK_ARGS)

setup(ext_modules=[ext] + cythonize([naive], quiet=True),
      cmdclass={"build_ext": BuildPerIsa})
