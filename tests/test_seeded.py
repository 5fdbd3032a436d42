"""runtime.seeded: a sample's crop is a function of its key alone, the caller's generator is left as
it was, and the cheaper implementation crops exactly as the fork_rng one it replaced."""
import contextlib

import numpy as np
import torch
from PIL import Image

from fastclip.config import compose_train_config
from fastclip.models.clip import build_transforms
from fastclip.runtime import sample_seed, seeded


@contextlib.contextmanager
def forked(*key: int):
    """The implementation before (fork_rng + torch.manual_seed): what existing runs cropped with."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(sample_seed(*key))
        yield


def _image() -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 40, 3), dtype=np.uint8))


def test_crops_equal_the_fork_rng_implementation():
    train, _ = build_transforms(compose_train_config([]).encoder)
    image = _image()
    for key in ((0, 0, 0), (0, 1, 7), (3, 2, 11, 5)):
        with forked(*key):
            before = train(image)
        with seeded(*key):
            after = train(image)
        assert torch.equal(before, after), key


def test_caller_state_restored_and_key_alone_decides():
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    with seeded(0, 1, 2):
        first = torch.rand(3)
    assert torch.equal(torch.rand(4), expected)  # the caller's stream continues as if nothing ran
    torch.rand(100)  # another caller state: the same key draws the same
    with seeded(0, 1, 2):
        assert torch.equal(torch.rand(3), first)
    with seeded(0, 1, 3):
        assert not torch.equal(torch.rand(3), first)


def test_state_restored_when_the_body_raises():
    torch.manual_seed(5)
    expected = torch.rand(2)
    torch.manual_seed(5)
    try:
        with seeded(1, 2, 3):
            torch.rand(10)
            raise ValueError("a bad sample")
    except ValueError:
        pass
    assert torch.equal(torch.rand(2), expected)
