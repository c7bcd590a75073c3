"""Augmented views of an image for token export: the image itself, its mirror image, or ten crops.

Generator pre-tokenisation scripts (LlamaGen's, TiTok's) store several views of every image so that a
generator trains on more than one view without re-encoding. The views here:

    none      1 view:   the recipe's image (shorter side to R, centre crop R x R; pipeline/images.py)
    flip      2 views:  that image and its horizontal mirror
    ten-crop  10 views: shorter side to S = int(1.1 R), centre crop S x S, then the four corner crops and
              the centre crop of R x R, and the mirror of each of those five (the ten images of
              torchvision's TenCrop, named rather than ordered by its convention)

Every view is a crop or a mirror of one decoded image (B, 3, S, S) with S = `source_resolution`, so a
stage decodes each image once, at S, and cuts its views from it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from revq_pipe.pipeline.choices import AUGMENTS
TEN_CROP_SCALE = 1.1  # the resize before ten-crop, as a multiple of the crop side (LlamaGen's crop_range)
_CORNERS = ("top-left", "top-right", "bottom-left", "bottom-right", "centre")


@dataclass(frozen=True)
class ViewSet:
    """The views one augmentation cuts from each decoded image.

    Args:
        name: one of AUGMENTS.
        resolution: R, the side of every view (what the VAE encodes).
        source_resolution: S, the side of the decoded image the views are cut from (R, or int(1.1 R)).
        names: one name per view, in the order views are stored.
    """

    name: str
    resolution: int
    source_resolution: int
    names: tuple[str, ...]

    @property
    def num_views(self) -> int:
        return len(self.names)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Decoded images (B, 3, S, S) -> views (B, V, 3, R, R)."""
        s, r = self.source_resolution, self.resolution
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, s, s):
            raise ValueError(f"the {self.name!r} views are cut from images (B, 3, {s}, {s}); got {tuple(images.shape)}")
        if self.name == "none":
            return images[:, None]
        if self.name == "flip":
            return torch.stack([images, images.flip(-1)], dim=1)
        far, centre = s - r, int(round((s - r) / 2.0))  # the centre offset as the recipe's centre crop computes it
        origins = [(0, 0), (0, far), (far, 0), (far, far), (centre, centre)]  # (top, left) per crop
        crops = [images[:, :, top:top + r, left:left + r] for top, left in origins]
        return torch.stack(crops + [crop.flip(-1) for crop in crops], dim=1)

    def describe(self) -> dict:
        """What a token store records about its views (JSON values only)."""
        return {"name": self.name, "num_views": self.num_views, "views": list(self.names),
                "resolution": self.resolution, "source_resolution": self.source_resolution}


def view_set(name: str, resolution: int) -> ViewSet:
    """The views of augmentation `name` (one of AUGMENTS) for images of side `resolution`."""
    if name == "none":
        return ViewSet(name, resolution, resolution, ("original",))
    if name == "flip":
        return ViewSet(name, resolution, resolution, ("original", "flip"))
    if name == "ten-crop":
        names = _CORNERS + tuple(f"{corner}-flip" for corner in _CORNERS)
        return ViewSet(name, resolution, int(resolution * TEN_CROP_SCALE), names)
    raise ValueError(f"augment={name!r} is not one of {', '.join(AUGMENTS)}")
