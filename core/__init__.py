"""Torch-free core shared by training, index and service: data, preprocessing, tokenizer, bundle, metrics."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("xclip-serve")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+local"
