"""Training batches copied to the GPU on a side stream, one batch ahead, so that the copy overlaps the
computation.

A non_blocking copy from pinned memory (the DataLoader's pin_memory) frees the host, but issued on the
compute stream it still runs after every kernel queued before it: batch n+1's copy waits for step n to
end, and step n+1 for the copy. Here batch n+1's copy is issued on its own stream before batch n is
handed to the loop, so it runs beside step n's kernels even where the host waits for the GPU at the
end of a step (an fp16 grad scaler's inf check); the compute stream waits for that batch's copy alone
(a CUDA event), not for the side stream's later work. The pattern of NVIDIA Apex's data_prefetcher and
timm's PrefetchLoader, written here for fastclip's Batch (timm's takes (input, target) pairs and
normalises itself)."""
import torch

from fastclip.data.pairs import Batch


class DeviceCopies:
    """batches (an iterable of Batch, with len) -> the same batches with images and tokens on the CUDA
    `device`, each copied on a side stream while the batch before it is in use (so two batches are on
    the device at once). Each batch's tensors are recorded on the compute stream (record_stream) so the
    caching allocator does not hand their memory to the side stream again while a step still reads
    them. A batch of only bad samples (images None) passes as it is. side: the copies' stream (default:
    a new one on `device` each epoch)."""

    def __init__(self, batches, device: torch.device, side: "torch.cuda.Stream | None" = None):
        if device.type != "cuda":
            raise ValueError(f"DeviceCopies: {device} has no CUDA streams")
        self.batches, self.device, self.side = batches, device, side

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        side, pending = self.side or torch.cuda.Stream(self.device), None
        for batch in self.batches:
            copy = self._issue(batch, side)
            if pending is not None:
                yield self._ready(*pending)
            pending = copy
        if pending is not None:
            yield self._ready(*pending)

    def _issue(self, batch: Batch, side: torch.cuda.Stream) -> tuple[Batch, torch.cuda.Event | None]:
        if batch.images is None:
            return batch, None
        with torch.cuda.stream(side):
            moved = Batch(batch.images.to(self.device, non_blocking=True),
                          batch.tokens.to(self.device, non_blocking=True), batch.skipped)
            copied = torch.cuda.Event()
            copied.record(side)
        return moved, copied

    def _ready(self, batch: Batch, copied: torch.cuda.Event | None) -> Batch:
        if copied is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(copied)
            batch.images.record_stream(compute)
            batch.tokens.record_stream(compute)
        return batch
