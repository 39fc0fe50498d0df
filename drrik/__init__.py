"""drrik: streaming sparse-autoencoder training."""
