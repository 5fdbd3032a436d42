"""Training images cross from the loader to the device as uint8, and are scaled and normalised there.

A float32 batch is 4x the bytes of the same batch as uint8 (154 MB against 39 MB for 256 images at
224 px): in each worker's shared memory, in the prefetch queue, in pinned memory and over the
host-to-device copy. The training transform therefore stops at a uint8 [3, H, W] tensor, and
DeviceNormalize does on the device what open_clip's transform ends with (ToTensor's /255, then
Normalize's (x - mean) / std) by a lookup: each channel's 256 possible values are computed once, on the
CPU, with those very float32 operations, so the normalised batch is bit for bit what open_clip's
transform makes of the same cropped uint8 image on any device (a CUDA division by 255 would round 126 of the 256 values differently);
tests/test_uint8_batches.py. Evaluation and inference keep open_clip's float transform (their batches
are not the bottleneck, and users call it).

The training crop runs on the uint8 tensor too (TensorRandomResizedCrop): torchvision's v2 kernel over
a channels-last view of the decoded image costs about a third of PIL's CPU at 224 px, the largest
part of a sample's cost in a loader worker (docs/results/benchmarks.md, bench-loader).
"""
import numpy as np
import torch
from torchvision.transforms import Compose, Normalize, RandomResizedCrop, v2


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


class TensorRandomResizedCrop:
    """open_clip's training crop (torchvision's RandomResizedCrop: a box drawn from torch's generator,
    resized bicubic with antialiasing) on a uint8 [C, H, W] tensor instead of a PIL image -> a contiguous
    uint8 [C, size, size]. The same draw gives the same box; torch's antialiased bicubic differs from
    PIL's by at most 2 of 255 on a few percent of the values at most (tests/test_uint8_batches.py). A PIL image is
    viewed channels-last (no transpose copy), the layout torchvision's fast uint8 kernel reads."""

    def __init__(self, crop: RandomResizedCrop):
        self.crop = v2.RandomResizedCrop(crop.size, crop.scale, crop.ratio, crop.interpolation, antialias=True)

    def __call__(self, image) -> torch.Tensor:
        if not isinstance(image, torch.Tensor):
            array = np.array(image, dtype=np.uint8)
            image = torch.from_numpy(array[:, :, None] if array.ndim == 2 else array).permute(2, 0, 1)
        return self.crop(image).contiguous()

    def __repr__(self) -> str:
        return f"TensorRandomResizedCrop({self.crop})"


class DeviceNormalize:
    """uint8 images [B, C, H, W] (any device) -> float32 (x / 255 - mean) / std, exactly as torchvision's
    ToTensor + Normalize compute it on the CPU. A float batch (a source that gave floats) passes
    unchanged. The lookup table moves to a device once (a per-step copy from pageable memory would make
    the host wait for the GPU's queue)."""

    def __init__(self, mean, std):
        values = torch.arange(256, dtype=torch.uint8).to(torch.float32).div(255)  # ToTensor's arithmetic
        mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1)
        std = torch.tensor(std, dtype=torch.float32).view(-1, 1)
        self.table = (values.view(1, -1) - mean).div(std).reshape(-1)  # [C * 256]: Normalize's, per channel
        self.channels = mean.shape[0]
        self._on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def _tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._on:
            offsets = (torch.arange(self.channels, dtype=torch.int32) * 256).view(1, -1, 1, 1)
            self._on[device] = (self.table.to(device), offsets.to(device))
        return self._on[device]

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8:
            return images
        table, offsets = self._tables(images.device)
        index = images.to(torch.int32) + offsets  # channel c's value v -> row c * 256 + v
        return table.index_select(0, index.reshape(-1)).view(images.shape)


def split_normalisation(transform: Compose) -> tuple[Compose, DeviceNormalize]:
    """open_clip's training transform (..., MaybeToTensor, Normalize) -> (the same up to a uint8
    tensor, the normalisation to run on the device). Its leading RandomResizedCrop moves after the
    mode conversion (made RGB first: per pixel, the same) onto the uint8 tensor. Raises ValueError where
    the transform does not end that way (another library version: then nothing is split)."""
    *head, to_tensor, normalize = transform.transforms
    if not isinstance(normalize, Normalize) or "ToTensor" not in type(to_tensor).__name__:
        raise ValueError(f"expected open_clip's training transform to end with ToTensor, Normalize: {transform}")
    if head and type(head[0]) is RandomResizedCrop:
        return Compose([*head[1:], TensorRandomResizedCrop(head[0])]), DeviceNormalize(normalize.mean, normalize.std)
    return Compose([*head, ToUint8Tensor()]), DeviceNormalize(normalize.mean, normalize.std)
