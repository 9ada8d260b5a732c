"""calm-train: distributed pretraining for Continuous Autoregressive Language Models."""
import os

# Bitwise-reproducible CPU math (exact resume, layout comparisons): MKL must not change its thread
# count with the machine's load (MKL_DYNAMIC) nor its code path with memory alignment (MKL_CBWR).
# Set before torch loads MKL; a user's own setting wins.
os.environ.setdefault("MKL_DYNAMIC", "FALSE")
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

__version__ = "0.1.0"
