"""Build the C extension; project metadata lives in pyproject.toml."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "nec_serve._rans",
            ["nec_serve/_rans.c"],
            extra_compile_args=["-O3", "-std=c11"],
            libraries=["m"],  # log2 for the entropy bound
        )
    ]
)
