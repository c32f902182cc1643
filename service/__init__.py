"""xclip-serve's HTTP service: FastAPI routes over an engine that runs ONNX bundles and FAISS collections.
It never imports torch."""

from core import __version__

__all__ = ["__version__"]
