"""Build entry point: compiles the Cython sources in kernels/ into fastopt's extensions.

Metadata lives in pyproject.toml.  A compile failure fails the install (no silent
pure-Python fallback).  No -march=native: wheels must run on any x86-64/arm64 CPU.
"""

import os
import sys

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup

OPENMP_COMPILE = ["/openmp"] if sys.platform == "win32" else ["-fopenmp"]
OPENMP_LINK = [] if sys.platform == "win32" else ["-fopenmp"]
COMMON = dict(include_dirs=[numpy.get_include()],
              define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
              extra_compile_args=["-O3"] if sys.platform != "win32" else ["/O2"])


def ext(name, source, openmp=False):
    kw = dict(COMMON)
    if openmp:
        kw["extra_compile_args"] = kw["extra_compile_args"] + OPENMP_COMPILE
        kw["extra_link_args"] = OPENMP_LINK
    return Extension(f"fastopt.{name}", [os.path.join("kernels", source)], **kw)


extensions = [
    ext("_cy_util", "_cy_util.pyx"),
    ext("_cy_dense", "_cy_dense.pyx", openmp=True),
]

setup(
    ext_modules=cythonize(extensions, compiler_directives={"language_level": 3},
                          build_dir="build/cython"),
)
