"""The reference job: train a small network on real data and keep a running average of it.

    torchrun --standalone --nproc-per-node 2 launch/train.py

trains an MLP (two hidden layers) on scikit-learn's bundled digits (8x8 images of
handwritten digits, shipped inside the package: no download) with DDP or FSDP2 on CPUs
(gloo) or GPUs (NCCL), keeps an EMA of its weights sharded across the ranks, and evaluates
the raw model and the average on a held-out split. It writes ``metrics.json``,
``heldout.png`` and ``average.pt`` to ``--out`` and prints both models' held-out accuracy
and loss, what averaging cost per step, and the files it wrote.

The default corrupts 20% of the *training* labels (the held-out labels are never touched)
and trains with a constant learning rate: the regime where averaging pays, because the
raw weights keep chasing the noisy labels while the average smooths over them.

The parts live in the ``job`` package beside this script (see ``job/__init__.py``).
"""

from __future__ import annotations

import torch.distributed as dist
from job.checkpoints import Progress, choose_checkpoint, load_checkpoint
from job.clock import Clock
from job.config import parse_args
from job.data import load_data
from job.distributed import close_distributed, restart_count, setup_distributed
from job.loop import train
from job.model import build_average, build_model, build_optimizer
from job.report import report


def main(argv: list[str] | None = None) -> None:
    # 1. config and process group
    args = parse_args(argv)
    device = setup_distributed(args.device)

    # 2. data, model, optimizer, the average
    data = load_data(args.seed, args.label_noise, device)
    model = build_model(args, device)
    optimizer = build_optimizer(args, model)
    clock = Clock(optimizer, device)
    ema = build_average(args, model, optimizer)
    clock.after_averager_built(optimizer)
    progress = Progress(model, optimizer)

    # 3. resume: explicitly, or whenever torchrun restarted this job after a failure
    if args.checkpoint_dir and (args.resume or restart_count() > 0):
        found = choose_checkpoint(args.checkpoint_dir)
        if found is not None:
            load_checkpoint(found, progress, ema)
            if dist.get_rank() == 0:
                print(f"resumed from {found} at step {progress.step}", flush=True)

    # 4. train, evaluating the raw model and the average on the held-out split
    train(args, data, model, optimizer, ema, progress, clock)

    # 5. report and close
    report(args, ema, progress, clock, len(data.y_test))
    ema.close()  # waits for the last update, stops the worker, removes the fence
    close_distributed()


if __name__ == "__main__":
    main()
