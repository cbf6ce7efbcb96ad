# Only what pyproject.toml cannot say: the cffi extension (native/build_native.py builds it).
from setuptools import setup

setup(cffi_modules=["native/build_native.py:ffibuilder"])
