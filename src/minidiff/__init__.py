"""minidiff: a small, fast, honest DDPM for MNIST."""
__version__ = "0.1.0"
