"""DeltaML: a privacy-preserving machine-learning marketplace."""

__version__ = "0.1.0"
