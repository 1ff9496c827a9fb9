"""recsys: declarative multi-domain search & recommendation foundation model on TorchRec."""
__version__ = "0.1.0"
