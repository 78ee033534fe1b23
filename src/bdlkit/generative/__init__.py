"""Generative models: TRIP priors, a VAE with pluggable priors, and the shared MNIST GAN."""
