"""autoprune: hardware-aware structured pruning of PyTorch CNNs for a named target device."""

__version__ = "0.1.0"
