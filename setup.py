"""Build entry point: compiles the Cython sources in kernels/ into fastopt's extensions.

Metadata lives in pyproject.toml.  A compile failure fails the install (no silent
pure-Python fallback).  No -march=native: wheels must run on any x86-64/arm64 CPU.

The .pyx sources are cythonized inside ``build_ext`` (into ``build/cython``, never
next to the sources), so an sdist carries kernels/*.pyx and *.pxd and no generated C.
Before anything is compiled, the C compiler is checked for OpenMP support, so a
compiler without it fails with a message that says what to install instead of a
wall of compiler errors.
"""

import os
import sys
import tempfile

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

CYTHON_BUILD_DIR = os.path.join("build", "cython")
COMPILER_DIRECTIVES = {"language_level": 3}

OPENMP_HELP = """\
fastopt needs a C compiler with OpenMP support to build its Cython extensions,
and the compiler in use ({cc}) cannot compile and link a program with {flags}.

Install one, then retry:
  * Debian/Ubuntu:  apt-get install gcc        (gcc ships OpenMP, libgomp)
  * Fedora/RHEL:    dnf install gcc
  * Alpine:         apk add gcc musl-dev
  * macOS:          brew install libomp llvm, then build with Homebrew's clang:
                    CC="$(brew --prefix llvm)/bin/clang" pip install fastopt
                    (Apple's clang does not accept -fopenmp)
  * Windows:        Visual Studio Build Tools (MSVC, /openmp)
A compiler can be chosen with the CC environment variable, e.g. CC=gcc.
"""

_PROBE_SOURCE = """\
#include <omp.h>
#include <stdio.h>

int main(void) {
    int n = 0;
    #pragma omp parallel reduction(+:n)
    n += 1;
    printf("%d %d\\n", n, omp_get_max_threads());
    return 0;
}
"""


def openmp_flags(compiler):
    """(compile flags, link flags) that turn on OpenMP for this compiler."""
    if compiler.compiler_type == "msvc":
        return ["/openmp"], []
    return ["-fopenmp"], ["-fopenmp"]


def check_openmp(compiler):
    """Compile and link a tiny OpenMP program with `compiler` in a temporary directory;
    exit with a clear message if that fails."""
    cflags, lflags = openmp_flags(compiler)
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="fastopt-openmp-") as tmp:
        with open(os.path.join(tmp, "openmp_probe.c"), "w") as f:
            f.write(_PROBE_SOURCE)
        try:
            os.chdir(tmp)   # relative names: the object lands beside the source
            objs = compiler.compile(["openmp_probe.c"], extra_postargs=cflags)
            compiler.link_executable(objs, "openmp_probe", extra_postargs=lflags)
        except Exception as exc:      # CompileError, LinkError, a missing executable
            cc = getattr(compiler, "compiler_so", None) or [compiler.compiler_type]
            cc = cc[0] if isinstance(cc, (list, tuple)) else cc
            raise SystemExit("\nerror: " + OPENMP_HELP.format(cc=cc, flags=" ".join(cflags))
                             + f"\n(probe failed: {exc})") from None
        finally:
            os.chdir(cwd)


class BuildExt(build_ext):
    """build_ext that checks for OpenMP, then cythonizes, then compiles."""

    def build_extensions(self):
        check_openmp(self.compiler)
        import numpy
        from Cython.Build import cythonize

        cflags, lflags = openmp_flags(self.compiler)
        for ext in self.extensions:
            ext.include_dirs.append(numpy.get_include())
            if getattr(ext, "_openmp", False):
                ext.extra_compile_args += cflags
                ext.extra_link_args += lflags
        # cythonize returns new Extension objects (with the sources' `# distutils:`
        # settings merged in); copy them onto the ones build_ext has set up.
        built = {e.name: e for e in cythonize(self.extensions, build_dir=CYTHON_BUILD_DIR,
                                              compiler_directives=COMPILER_DIRECTIVES)}
        for ext in self.extensions:
            new = built[ext.name]
            for attr in _EXT_ATTRS:
                setattr(ext, attr, getattr(new, attr))
        super().build_extensions()


_EXT_ATTRS = ("sources", "include_dirs", "define_macros", "undef_macros", "libraries",
              "library_dirs", "runtime_library_dirs", "extra_objects", "extra_compile_args",
              "extra_link_args", "export_symbols", "depends", "language")


def ext(name, source, openmp=False):
    e = Extension(f"fastopt.{name}", [os.path.join("kernels", source)],
                  include_dirs=["kernels"],             # the kernels/*.h headers
                  depends=[os.path.join("kernels", h) for h in
                           ("fastopt_codecs.h", "fastopt_af_lanes.h")],
                  define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
                  extra_compile_args=["/O2"] if sys.platform == "win32" else ["-O3"])
    e._openmp = openmp
    return e


setup(
    ext_modules=[
        ext("_cy_util", "_cy_util.pyx"),
        ext("_cy_dense", "_cy_dense.pyx", openmp=True),
    ],
    cmdclass={"build_ext": BuildExt},
)
