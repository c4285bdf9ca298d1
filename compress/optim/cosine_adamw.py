"""Where CosineAdamW used to live (it is in dense.py with the other dense optimizer)."""
from compress.optim.dense import CosineAdamW

__all__ = ["CosineAdamW"]
