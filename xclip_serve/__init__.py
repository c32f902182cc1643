"""xclip-serve: train CLIP / nCLIP / xCLIP dual encoders, export ONNX bundles, serve them."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("xclip-serve")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+local"
