"""Training steps on fixed random cases, in whatever World this process is part of; rank 0 saves what they did.

Run by tests/test_distributed.py, once as one process and once under torchrun with two, to compare
the gradients every step produces: `python distributed_steps.py OUT.pt`.
"""

import sys
from dataclasses import replace

import numpy as np
import torch
from tiny_runs import tiny_config

from hypersort_core.distributed import joined
from hypersort_core.train import Trainer, build_optimizers, initial_model, train_step

CASES = 8
# Global batches: even (2 + 2 per process), uneven (2 + 1), a single case (one process gets none), one whose
# second case has a NaN image (every process must skip the step), and one whose second case is unreadable
# (every process must learn of it, and train on the rest).
GLOBAL_BATCHES = [[5, 0, 3, 6], [1, 7, 2], [4], [2, 5], [6, 1]]
NAN_IMAGE = {3: 5}  # step -> case
UNREADABLE = {4: 1}


def run(out: str) -> None:
    config = tiny_config(seed=3)
    config = replace(config, model=replace(config.model, latent_init_std=0.5))
    generator = torch.Generator().manual_seed(11)
    images = torch.randn(CASES, 1, *config.preprocess.roi, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 2, (CASES, *config.preprocess.roi), generator=generator)
    device = torch.device("cpu")
    with joined("cpu") as world:
        model = initial_model(config, [f"case{i}" for i in range(CASES)], device).double()
        trainer = Trainer(model, build_optimizers(model, config, device), config, device, world, world.synchronized(model.hypernet, device))
        record = []
        for number, global_batch in enumerate(GLOBAL_BATCHES):
            step = train_step(trainer, share_of(number, global_batch, world, images, labels), global_batch)
            record.append(
                {
                    "loss": step.loss,
                    "stepped": step.stepped,
                    "unreadable": step.unreadable,
                    "hypernet_grads": [p.grad.clone() if p.grad is not None else None for p in model.hypernet.parameters()],
                    "latent_grad": model.latents.weight.grad.to_dense().clone() if step.stepped else None,
                    "latents": model.latents.weight.detach().clone(),
                }
            )
        if world.is_main:
            torch.save(record, out)


def share_of(number: int, global_batch: list[int], world, images: torch.Tensor, labels: torch.Tensor) -> dict:
    """This process's share of a global batch, as the DataLoader would give it."""
    share = np.array_split(global_batch, world.size)[world.rank].tolist()
    readable = [case for case in share if UNREADABLE.get(number) != case]
    image = images[readable].clone()
    if NAN_IMAGE.get(number) in readable:
        image[readable.index(NAN_IMAGE[number])] = float("nan")
    unreadable = [(case, f"case{case}: unreadable") for case in share if case not in readable]
    return {"index": torch.tensor(readable, dtype=torch.long), "image": image, "label": labels[readable], "unreadable": unreadable}


if __name__ == "__main__":
    run(sys.argv[1])
