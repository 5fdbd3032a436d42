"""Training batches reach a GPU through a side-stream copy issued one batch ahead
(data/device_copies.py): the same batches, in order, on the device, with a batch of only bad samples
passed as it is, and the compute stream waiting for each copy (a side stream held back by a long
kernel would otherwise hand the step memory not yet written)."""
import pytest
import torch

from fastclip.data.device_copies import DeviceCopies
from fastclip.data.pairs import Batch


def host_batches(pixels: int = 8) -> list[Batch]:
    g = torch.Generator().manual_seed(0)
    return [Batch(torch.randint(0, 256, (4, 3, pixels, pixels), dtype=torch.uint8, generator=g),
                  torch.randint(0, 100, (4, 7), generator=g), {}),
            Batch(None, None, {"undecodable image": 4}),
            Batch(torch.randint(0, 256, (2, 3, pixels, pixels), dtype=torch.uint8, generator=g),
                  torch.randint(0, 100, (2, 7), generator=g), {"missing file": 2})]


def test_only_a_cuda_device_takes_side_stream_copies():
    with pytest.raises(ValueError, match="cpu has no CUDA streams"):
        DeviceCopies(host_batches(), torch.device("cpu"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_on_a_gpu_each_batch_arrives_on_the_device_equal_to_the_host_batch():
    device = torch.device("cuda")
    side = torch.cuda.Stream(device)
    with torch.cuda.stream(side):  # ~0.5 s of GPU sleep first: a copy the step did not wait for reads as garbage
        torch.cuda._sleep(1_000_000_000)
    batches = [Batch(b.images.pin_memory(), b.tokens.pin_memory(), b.skipped) if b.images is not None else b
               for b in host_batches(pixels=224)]
    arrived = []
    for batch in DeviceCopies(batches, device, side):
        if batch.images is not None:  # used on the compute stream at once, as a step would
            arrived.append(Batch(batch.images.float().mul(2), batch.tokens + 1, batch.skipped))
        else:
            arrived.append(batch)
    torch.cuda.synchronize()
    for host, got in zip(batches, arrived, strict=True):
        assert got.skipped == host.skipped
        if host.images is None:
            assert got.images is None
            continue
        assert got.images.device.type == "cuda"
        assert torch.equal(got.images.cpu(), host.images.float() * 2) and torch.equal(got.tokens.cpu(), host.tokens + 1)
