"""Image fine-tuning augmentation: the MAE / timm recipe (``main_finetune.py``'s ``create_transform``
and ``Mixup``) built from ``torchvision.transforms.v2``.

Per image: RandomResizedCrop (bicubic, scale ``(crop_scale, 1)``) + horizontal flip ->
RandAugment (``ops`` x magnitude, on uint8 as timm's ``rand-m9``) -> [0, 1] -> the dataset's
normalisation (:func:`d2v.data.transforms.image_tensor`) -> RandomErasing with per-pixel normal
noise (timm's ``re_mode='pixel'``). Per batch: MixUp or CutMix (one of the two at random when
both alphas are set, timm's ``switch_prob`` 0.5), giving soft targets; label smoothing is applied
to them by the loss (:meth:`d2v.models.heads.Classifier.loss`).

The random draws of a batch are seeded by (seed, the batch's sample keys) in a forked RNG, so a
batch is augmented the same way for the pretrained and the random-init run, in any loader worker
or process, and after a resume; the global RNG (dropout, drop path) is left untouched.
"""

from __future__ import annotations

import functools
import zlib
from dataclasses import dataclass

import torch

from d2v.data import transforms


@dataclass(frozen=True)
class ImageAugment:
    size: int
    in_chans: int
    crop_scale: float = 0.0  # 0: no random crop (resize only)
    rand_augment: int = 0  # RandAugment ops per image (0: off)
    magnitude: int = 9
    erasing: float = 0.0  # RandomErasing probability
    mixup: float = 0.0  # MixUp alpha (0: off)
    cutmix: float = 0.0  # CutMix alpha (0: off)
    num_classes: int = 0
    seed: int = 0
    mean: tuple[float, ...] = (transforms.IMAGE_MEAN,)  # transforms.image_stats(data.image.dataset)
    std: tuple[float, ...] = (transforms.IMAGE_STD,)

    @property
    def mixes(self) -> bool:
        return self.mixup > 0 or self.cutmix > 0

    @functools.cached_property
    def _per_image(self):
        from torchvision.transforms import InterpolationMode, v2

        geo = ([v2.RandomResizedCrop(self.size, scale=(self.crop_scale, 1.0), interpolation=InterpolationMode.BICUBIC,
                                     antialias=True), v2.RandomHorizontalFlip()] if self.crop_scale > 0 else [])
        ra = [v2.RandAugment(self.rand_augment, self.magnitude)] if self.rand_augment else []
        erase = v2.RandomErasing(self.erasing, value="random") if self.erasing > 0 else None
        return v2.Compose(geo + ra) if geo or ra else None, erase

    @functools.cached_property
    def _per_batch(self):
        from torchvision.transforms import v2

        mix = ([v2.MixUp(alpha=self.mixup, num_classes=self.num_classes)] if self.mixup > 0 else []) + (
            [v2.CutMix(alpha=self.cutmix, num_classes=self.num_classes)] if self.cutmix > 0 else [])
        return mix[0] if len(mix) == 1 else v2.RandomChoice(mix)

    def image(self, x: torch.Tensor) -> torch.Tensor:
        """One decoded image, (C, H, W) uint8 -> the model's normalised input."""
        if x.dtype != torch.uint8:
            raise TypeError(f"ImageAugment.image takes uint8 (C, H, W), got {x.dtype}")
        geo_ra, erase = self._per_image
        if geo_ra is not None:
            x = geo_ra(x)
        x = transforms.image_tensor(x.float().div_(255), self.size, self.in_chans, self.mean, self.std)
        return erase(x) if erase is not None else x

    def __call__(self, images: list[torch.Tensor], labels: torch.Tensor, keys: list[str]
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A batch: (normalised images (B, C, S, S), soft targets (B, classes) when mixing, else None)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(batch_seed(self.seed, keys))
            src = torch.stack([self.image(x) for x in images])
            if not self.mixes:
                return src, None
            src, soft = self._per_batch(src, labels)
            return src, soft


def batch_seed(seed: int, keys: list[str]) -> int:
    """A seed from the run's seed and the batch's sample keys (stable across processes, unlike ``hash``)."""
    return zlib.crc32("\n".join(keys).encode("utf-8"), seed & 0xFFFFFFFF)
