"""Training batches cross to the device as uint8 and are normalised there (fastclip/data/uint8_images.py):
bit-for-bit what open_clip's float transform gives, at a quarter of the bytes."""
import numpy as np
import open_clip
import torch
from PIL import Image

from conftest import TINY_CLIP, compose_cfg
from fastclip.data.uint8_images import split_normalisation
from fastclip.tasks.clip import ClipTask


def test_the_uint8_path_normalises_on_the_device_exactly_as_open_clips_transform():
    full = open_clip.image_transform(32, is_train=True)
    to_uint8, normalize = split_normalisation(full)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((40, 37), (32, 32))]
    images.append(Image.fromarray(rng.integers(0, 256, (20, 24), dtype=np.uint8), "L"))  # grayscale: made RGB
    for image in images:
        torch.manual_seed(7)  # the random crop draws from torch's generator: the same crop both ways
        expected = full(image)
        torch.manual_seed(7)
        small = to_uint8(image)
        assert small.dtype == torch.uint8 and small.shape == expected.shape
        assert torch.equal(normalize(small.unsqueeze(0))[0], expected)  # bit for bit, not approximately
    assert torch.equal(normalize(expected.unsqueeze(0)), expected.unsqueeze(0))  # a float batch passes as it is


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
