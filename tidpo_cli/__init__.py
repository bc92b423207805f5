"""tidpo: Token-Importance Guided DPO (arXiv 2505.19653) and plain DPO, from the command line."""

__version__ = "0.1.0"
