"""The optional C speed-ups (hpcconv/_native.c); everything else is in pyproject.toml.

Without a C compiler (or Python headers) the build of the extension fails quietly and hpcconv runs
its pure-Python code instead."""
from setuptools import Extension, setup

setup(ext_modules=[Extension("hpcconv._native", ["hpcconv/_native.c"], optional=True,
                             extra_compile_args=["-O2"])])
