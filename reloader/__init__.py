"""reloader: serve PyTorch image classifiers and hot-reload them from the filesystem."""

__version__ = "0.1.0"
