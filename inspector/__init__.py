"""Inspector: streaming visual inspection for mixed-product factory lines."""

__version__ = "0.1.0"
