"""Build the Cython fast path. A compile failure fails the install: there is no silent pure-Python install."""

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup

extensions = [
    Extension(
        "streamscore.fastpath._fast",
        ["fastpath/_fast.pyx"],
        include_dirs=[numpy.get_include()],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        extra_compile_args=["-O3"],
    ),
]

setup(
    ext_modules=cythonize(
        extensions, language_level=3, compiler_directives={"boundscheck": False, "wraparound": False}
    )
)
