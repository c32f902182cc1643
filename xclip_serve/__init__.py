"""xclip-serve: train CLIP / nCLIP / xCLIP dual encoders, export ONNX bundles, serve them."""

from core import __version__

__all__ = ["__version__"]
