"""roseprior: what the stages share (configs, data, splits, image ops, synthetic data, checkpoints)."""

__version__ = "0.1.0"
