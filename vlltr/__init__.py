"""vlltr: train, export and serve VL-LTR long-tailed image classifiers that learn from class text."""

__version__ = "0.1.0"
