"""Training images cross from the loader to the device as uint8, and are scaled and normalised there.

A float32 batch is 4x the bytes of the same batch as uint8 (154 MB against 39 MB for 256 images at
224 px): in each worker's shared memory, in the prefetch queue, in pinned memory and over the
host-to-device copy. The training transform therefore stops at a uint8 [3, H, W] tensor, and
DeviceNormalize does on the device what open_clip's transform ends with (ToTensor's /255, then
Normalize's (x - mean) / std), with the same float32 operations in the same order: the normalised
batch is bit-for-bit the one open_clip's transform makes (tests/test_uint8_batches.py). Evaluation and
inference keep open_clip's float transform (their batches are not the bottleneck, and users call it).
"""
import numpy as np
import torch
from torchvision.transforms import Compose, Normalize


class ToUint8Tensor:
    """PIL image -> uint8 tensor [C, H, W] (torchvision's PILToTensor for RGB images; a tensor passes)."""

    def __call__(self, image) -> torch.Tensor:
        if isinstance(image, torch.Tensor):
            return image
        array = np.asarray(image, dtype=np.uint8)
        if array.ndim == 2:
            array = array[:, :, None]
        return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()

    def __repr__(self) -> str:
        return "ToUint8Tensor()"


class DeviceNormalize:
    """uint8 images [B, 3, H, W] (any device) -> float32 (x / 255 - mean) / std, as torchvision's
    ToTensor + Normalize compute it. A float batch (a source that gave floats) passes unchanged."""

    def __init__(self, mean, std):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8:
            return images
        x = images.to(torch.float32).div(255)
        return x.sub_(self.mean.to(x.device)).div_(self.std.to(x.device))


def split_normalisation(transform: Compose) -> tuple[Compose, DeviceNormalize]:
    """open_clip's training transform (..., MaybeToTensor, Normalize) -> (the same up to a uint8
    tensor, the normalisation to run on the device). Raises ValueError where the transform does not
    end that way (another library version: then nothing is split)."""
    *head, to_tensor, normalize = transform.transforms
    if not isinstance(normalize, Normalize) or "ToTensor" not in type(to_tensor).__name__:
        raise ValueError(f"expected open_clip's training transform to end with ToTensor, Normalize: {transform}")
    return Compose([*head, ToUint8Tensor()]), DeviceNormalize(normalize.mean, normalize.std)
