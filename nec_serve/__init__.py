"""Serving Neural Embedding Compression (NEC) for Earth-observation workflows.

The core package holds what every deployable shares and that needs no PyTorch: the
entropy tables, the rANS coder, the bitstream container, imagery I/O and the CLI.
Models live in ``nec_models`` and graph export in ``nec_export``.
"""

__all__ = ["__version__"]

__version__ = "0.1.0"
