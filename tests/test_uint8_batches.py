"""Training batches cross to the device as uint8 and are normalised there (fastclip/data/uint8_images.py):
bit-for-bit what open_clip's float transform makes of the same uint8 image, at a quarter of the bytes;
the random crop on the uint8 tensor takes the box open_clip's would and its pixels within 2 of 255."""
import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from torchvision.transforms import Compose, RandomResizedCrop

from conftest import TINY_CLIP, compose_cfg
from fastclip.data.uint8_images import TensorRandomResizedCrop, ToUint8Tensor, split_normalisation
from fastclip.tasks.clip import ClipTask


def test_the_uint8_path_normalises_on_the_device_exactly_as_open_clips_transform():
    full = open_clip.image_transform(32, is_train=True)
    to_uint8, normalize = split_normalisation(full)
    assert isinstance(to_uint8.transforms[-1], TensorRandomResizedCrop)
    after_crop = Compose(full.transforms[1:])  # open_clip's transform from its crop on: to RGB, ToTensor, Normalize
    rng = np.random.default_rng(0)
    for image in (Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)),
                  Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8), "L")):  # grayscale: made RGB
        small = ToUint8Tensor()(image.convert("RGB"))
        assert small.dtype == torch.uint8
        assert torch.equal(normalize(small.unsqueeze(0))[0], after_crop(image))  # bit for bit, not approximately
    cropped = to_uint8(Image.fromarray(rng.integers(0, 256, (40, 37), dtype=np.uint8), "L"))
    assert cropped.dtype == torch.uint8 and cropped.shape == (3, 32, 32) and cropped.is_contiguous()
    expected = after_crop(Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)))
    assert torch.equal(normalize(expected.unsqueeze(0)), expected.unsqueeze(0))  # a float batch passes as it is


@pytest.mark.parametrize("height, width, size", [(8, 8, 32), (40, 37, 32), (256, 288, 224), (500, 375, 224)])
def test_the_crop_on_the_uint8_tensor_takes_open_clips_box_and_pixels_within_2_levels(height, width, size):
    """Up (the digits) and down (photos at 224 px), noise and smooth images, several draws."""
    pil_crop = open_clip.image_transform(size, is_train=True).transforms[0]
    assert type(pil_crop) is RandomResizedCrop
    tensor_crop = TensorRandomResizedCrop(pil_crop)
    rng = np.random.default_rng(0)
    smooth = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
    noise = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    for image in (smooth, noise):
        for seed in range(3):
            torch.manual_seed(seed)
            expected = ToUint8Tensor()(pil_crop(image)).int()
            torch.manual_seed(seed)
            got = tensor_crop(image).int()
            differ = (got - expected).abs()
            assert got.shape == expected.shape and int(differ.max()) <= 2, (seed, int(differ.max()))
            assert float((differ > 0).float().mean()) < 0.03  # the same box: almost every value equal (another: most differ)


def test_a_clip_tasks_training_batches_are_uint8_until_the_device(tmp_path):
    task = ClipTask(compose_cfg(TINY_CLIP), torch.device("cpu"))
    batch = next(iter(task.train_batches(0)))
    assert batch.images.dtype == torch.uint8  # a quarter of float32's bytes through workers, pinning and the copy
    images, tokens = task.device_inputs(batch)
    assert images.dtype == torch.float32 and images.shape == batch.images.shape
    assert -3 < float(images.min()) < 0 < float(images.max()) < 3  # normalised, not 0..255


def test_the_lookup_table_reaches_a_device_once():
    """A per-step copy of the table from pageable memory would make the host wait for the GPU's queue."""
    _, normalize = split_normalisation(open_clip.image_transform(32, is_train=True))
    batch = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    first = normalize(batch)
    table = normalize._on[batch.device][0]
    assert torch.equal(normalize(batch), first) and normalize._on[batch.device][0] is table
