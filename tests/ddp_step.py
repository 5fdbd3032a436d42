"""Two optimizer steps of a config, in one process or data-parallel under torchrun: rank 0 saves the
first step's loss as the loop would log it (the mean over ranks), each rank's own and its gradients after the backward
(DDP's averaged ones), and the weights after both steps (a second forward is where DDP notices a
parameter that got no gradient), for tests/test_distributed.py to compare.

    torchrun --standalone --nproc_per_node=2 tests/ddp_step.py OUT.pt [override ...]
    python tests/ddp_step.py OUT.pt [override ...]
"""
import sys

import torch

from fastclip import distributed, runtime
from fastclip.config import compose_train_config
from fastclip.loop import Trainer
from fastclip.tasks import build_task


def main(path: str, overrides: list[str]) -> None:
    cfg = compose_train_config(overrides)
    world, device = distributed.init("cpu")
    runtime.seed_everything(cfg.seed)
    task = build_task(cfg, device, None)
    trainer = Trainer(task, cfg, device)
    batches = iter(task.train_batches(0))
    for step in range(2):
        micro = [next(batches) for _ in range(trainer.accum)]  # trainer.accum_steps of them, as the loop runs them
        out = trainer.accumulate(micro)[-1]
        batch = micro[-1]
        if step == 0:
            loss = distributed.mean(out.loss.detach())
            rank_losses = distributed.gather(float(out.loss))
            grads = {name: p.grad.clone() for name, p in task.model.named_parameters() if p.grad is not None}
        trainer.step()
    if world.main:
        torch.save({"loss": loss, "grads": grads, "weights": task.model.state_dict(), "world_size": world.size,
                    "rank_losses": rank_losses,
                    "local_batch": len(batch.images),
                    "trainable": [name for name, p in task.model.named_parameters() if p.requires_grad]}, path)
    distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
