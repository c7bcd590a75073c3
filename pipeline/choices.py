"""The named options that the config validates and the libraries implement, in one torch-free module.

The command line must start without importing torch, so stages/config.py cannot import the modules that
implement these options; both import the names from here, and each implementing module checks its own
argument against the same tuple.
"""

PRECISIONS = ("fp32", "tf32", "bf16")  # pipeline/precision.py
INIT_METHODS = ("sample", "kmeans++")  # pipeline/quantizer.py: how init_from_samples seeds the codebooks
RESIDENCY = ("auto", "always", "never")  # cache/loader.py: where a training split is read from
TRAINABLE = ("codebooks", "rectifier")  # stages/train.py: the parts the optimizer may change
ADAPTABLE = (*TRAINABLE, "statistics")  # stages/adapt.py: what adapting to a new domain may change
AUGMENTS = ("none", "flip", "ten-crop")  # pipeline/views.py: the views of every image a token export stores
