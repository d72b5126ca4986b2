"""Builds the shared-memory rings' optional C hot path (pyproject.toml holds everything else).

Without a C compiler the build goes on without it, and pipeline.runtime.shm runs its Python path.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("pipeline.runtime._ring", ["pipeline/runtime/_ring.c"], optional=True,
                             extra_compile_args=["-O2"])])
