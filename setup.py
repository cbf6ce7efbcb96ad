# Only what pyproject.toml cannot say: the cffi extension (native/build_native.py builds it), and a check
# before compiling it that names the package to install when xxHash is missing.
import importlib.util
import os

from setuptools import setup
from setuptools.command.build_ext import build_ext


def _build_script():  # native/ is not a package: load the build script by path
    spec = importlib.util.spec_from_file_location("build_native", os.path.join("native", "build_native.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class CheckedBuildExt(build_ext):
    def run(self):
        _build_script().require_xxhash()
        super().run()


setup(
    cffi_modules=["native/build_native.py:ffibuilder"],
    cmdclass={"build_ext": CheckedBuildExt},
    # cffi builds the C core against the stable ABI (_native.abi3.so): one wheel serves CPython 3.11 and later
    options={"bdist_wheel": {"py_limited_api": "cp311"}},
)
