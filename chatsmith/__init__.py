"""chatsmith: build your own ChatGPT, end to end, in plain PyTorch."""

__version__ = "0.1.0"
