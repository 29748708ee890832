"""Only the compiled part of the build: the nghttp2 binding (metadata is in pyproject.toml)."""

from setuptools import setup

setup(cffi_modules=["sidecar/proxy/http2/_build.py:ffibuilder"])
