"""Class accuracy of generated images: a small CNN trained here on the real train images of the token store.

The classifier is asked which class an image shows. On real val images its accuracy says how well it
works at all; on decoded class-conditional samples, whether a sample shows the class it was asked
for; on decodes of uniformly random tokens, what the decoder makes of ids without a model (near
chance when the classifier does not confuse decoder noise with one class). This is the direction of
an "Inception accuracy" (a classifier of real images judging samples); Ravuri and Vinyals' CAS
(2019) trains on samples and tests on real images instead, which needs many more samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from revq_pipe.pipeline.images import to_model_range, to_uint8
from revq_pipe.stages.datasets import image_batches, open_image_dataset

CHANNELS = (16, 32, 64, 64)  # four conv stages, each halving the side
BATCH_SIZE = 64
LR = 3e-3
SHIFT = 4  # pixels of random translation in training (with horizontal flips)


@dataclass
class LabelledImages:
    images: torch.Tensor  # (N, 3, R, R) uint8
    labels: torch.Tensor  # (N,) int64; -1 for an image of no class

    def labelled(self) -> "LabelledImages":
        """The images that have a class (what a classifier trains and is scored on)."""
        keep = self.labels >= 0
        return LabelledImages(self.images[keep], self.labels[keep])


def load_images(source: str, resolution: int, *, limit: int, num_workers: int, options=None) -> LabelledImages:
    """The readable images of `source` through the recipe at `resolution` (all, or `limit` evenly spaced), with
    their labels (-1: no class; `.labelled()` keeps the others)."""
    dataset = open_image_dataset(source, options)
    index = np.arange(len(dataset))
    if limit and limit < len(index):
        index = np.unique(np.linspace(0, len(index) - 1, limit).round().astype(np.int64))
    batches = [index[i:i + BATCH_SIZE].tolist() for i in range(0, len(index), BATCH_SIZE)]
    images, labels = [], []
    for batch in image_batches(dataset, batches, resolution, num_workers, torch.device("cpu")):
        if batch.images is not None:
            images.append(to_uint8(batch.images))
            labels += [dataset.label(i) for i in batch.indices]
    if not images:
        raise ValueError(f"no readable image in {source}; the class accuracy needs the token store's source images")
    return LabelledImages(torch.cat(images), torch.tensor(labels, dtype=torch.long))


def small_classifier(num_classes: int) -> nn.Sequential:
    """Four conv-BN-ReLU-pool stages, global average pooling, one linear layer (any input side >= 16)."""
    layers, width = [], 3
    for channels in CHANNELS:
        layers += [nn.Conv2d(width, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(), nn.MaxPool2d(2)]
        width = channels
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))


def train_classifier(data: LabelledImages, num_classes: int, *, epochs: int, seed: int,
                     device: torch.device) -> nn.Module:
    """AdamW on random flips and shifts of the images, seeded (the same classifier every run)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = small_classifier(num_classes).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=1e-4)
    steps = epochs * max(1, len(data.labels) // BATCH_SIZE)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=LR, total_steps=steps)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(data.labels), generator=generator)
        for index in order[:len(order) // BATCH_SIZE * BATCH_SIZE].view(-1, BATCH_SIZE):
            x = _augment(to_model_range(data.images[index]), generator).to(device)
            loss = F.cross_entropy(model(x), data.labels[index].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()


def _augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal flips and translations by up to SHIFT pixels (reflection padding) of (B, 3, R, R)."""
    flip = torch.rand(len(x), generator=generator) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    side = x.shape[-1]
    padded = F.pad(x, (SHIFT,) * 4, mode="reflect")
    dy, dx = torch.randint(0, 2 * SHIFT + 1, (2,), generator=generator).tolist()  # one shift per batch
    return padded[:, :, dy:dy + side, dx:dx + side]


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of uint8 images (N, 3, R, R) the classifier assigns to their label."""
    device = next(model.parameters()).device
    correct = sum(int((model(to_model_range(chunk).to(device)).argmax(1).cpu() == target).sum())
                  for chunk, target in zip(images.split(256), labels.split(256)))
    return correct / len(labels)
