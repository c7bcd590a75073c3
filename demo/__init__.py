"""The embedded demo's tooling, kept apart from the product's stages: its image set
(`images.py`, cut from scikit-image's photographs), the training of its small VAE
(`vae_training.py`), and that VAE itself as package data (`vae/`: config.json, the weights and
training_recipe.json), the built-in default `vae.source`.

Nothing is imported here, so that locating the package data (stages/config.py) imports no torch.
"""
