"""Training steps on fixed random cases, in whatever World this process is part of; rank 0 saves what they did.

Run by tests/test_distributed.py, once as one process and once under torchrun with two, to compare
the gradients every step produces: `python distributed_steps.py OUT.pt`.
"""
import sys
from contextlib import nullcontext
from dataclasses import replace

import numpy as np
import torch
from tiny_runs import tiny_config

from hypersort_core.distributed import joined
from hypersort_core.train import _train_step, build_optimizers, initial_model

CASES = 8
# Global batches: even (2 + 2 per process), uneven (2 + 1) and a single case (one process gets none).
GLOBAL_BATCHES = [[5, 0, 3, 6], [1, 7, 2], [4]]


def run(out: str) -> None:
    config = tiny_config(seed=3)
    config = replace(config, model=replace(config.model, latent_init_std=0.5))
    generator = torch.Generator().manual_seed(11)
    images = torch.randn(CASES, 1, *config.preprocess.roi, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 2, (CASES, *config.preprocess.roi), generator=generator)
    device = torch.device("cpu")
    with joined("cpu") as world:
        model = initial_model(config, [f"case{i}" for i in range(CASES)], device).double()
        optimizers = build_optimizers(model, config, device)
        hypernet = world.synchronized(model.hypernet, device)
        record = []
        for global_batch in GLOBAL_BATCHES:
            share = np.array_split(global_batch, world.size)[world.rank].tolist()
            batch = {"index": torch.tensor(share, dtype=torch.long), "image": images[share], "label": labels[share]}
            step = _train_step(model, optimizers, batch, config, device, nullcontext(), hypernet, world, global_batch)
            record.append({
                "loss": step.loss,
                "hypernet_grads": [p.grad.clone() for p in model.hypernet.parameters()],
                "latent_grad": model.latents.weight.grad.to_dense().clone(),
                "latents": model.latents.weight.detach().clone(),
            })
        if world.is_main:
            torch.save(record, out)


if __name__ == "__main__":
    run(sys.argv[1])
