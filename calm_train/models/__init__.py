"""The math of CALM: autoencoder, backbone, energy head and score, CALM, AR baseline, BrierLM, sampling."""
