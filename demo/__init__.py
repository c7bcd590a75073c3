"""The embedded demo's tooling, kept apart from the product's stages: its image set
(`images.py`, cut from scikit-image's photographs) and the training of its small VAE
(`vae_training.py`, whose result is committed in `demo/vae/`)."""

from revq_pipe.demo.images import DEMO_PHOTOS, IMAGE_SIZE, load_demo_photos, write_demo_images
from revq_pipe.demo.vae_training import DEMO_VAE_CONFIG, train_demo_vae

__all__ = ["DEMO_PHOTOS", "DEMO_VAE_CONFIG", "IMAGE_SIZE", "load_demo_photos", "train_demo_vae", "write_demo_images"]
