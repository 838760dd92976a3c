"""Native extensions; everything else is in setup.cfg.

Each entry of NATIVE is an optional C extension: a failed build leaves the pure-Python path
(the code checks the module's presence, and LYMPH_CV_NATIVE=0 turns the native paths off).
Per-CPU code comes from gcc's target attributes in the sources (target_clones, or target plus a
__builtin_cpu_supports dispatch), never from -march=native, so a build runs on any x86-64
machine of this kind.
"""
from setuptools import Extension, setup

#: -O3 without -ffast-math: the float32 sums must round exactly as written.
CFLAGS = ["-O3", "-std=c11", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Wno-missing-field-initializers",
          "-pthread"]

NATIVE = [
    Extension("lymph_cv.formats.ldbscan", ["lymph_cv/formats/ldbscan.c"],
              extra_compile_args=CFLAGS, extra_link_args=["-pthread"], optional=True),
    Extension("lymph_cv.formats.ldbwrite", ["lymph_cv/formats/ldbwrite.c"],
              extra_compile_args=CFLAGS, optional=True),
    Extension("lymph_cv.formats.convread", ["lymph_cv/formats/convread.c"],
              extra_compile_args=CFLAGS, optional=True),
    Extension("lymph_cv.net.maxpool16", ["lymph_cv/net/maxpool16.c"],
              extra_compile_args=CFLAGS, extra_link_args=["-pthread"], optional=True),
    Extension("lymph_cv.net.amxconv", ["lymph_cv/net/amxconv.c"],
              extra_compile_args=CFLAGS, extra_link_args=["-pthread"], optional=True),
]

setup(ext_modules=NATIVE)
