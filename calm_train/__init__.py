"""calm-train: distributed pretraining for Continuous Autoregressive Language Models."""
__version__ = "0.1.0"
