"""The training loop, and the held-out evaluation of the raw model and the average."""

from __future__ import annotations

import argparse
import functools
import os
from collections.abc import Callable
from typing import Protocol

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

import distavg

from .checkpoints import save_checkpoint
from .clock import Clock
from .data import Data, batch_indices
from .distributed import restart_count


class Steps(Protocol):
    """The loop's progress: the step and the evaluations so far (``checkpoints.Progress``)."""

    step: int
    history: list[dict[str, float]]


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) on the whole held-out split, the same on every rank."""
    logits = model(x)
    acc = (logits.argmax(1) == y).float().mean().item()
    return acc, F.cross_entropy(logits, y).item()


def total_steps(args: argparse.Namespace, n_train: int) -> int:
    return args.steps or args.epochs * (n_train // args.batch_size)


def train(
    args: argparse.Namespace,
    data: Data,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    ema: distavg.BaseAveragedModel,
    progress: Steps,
    clock: Clock,
    *,
    backward: Callable[[torch.Tensor], None] = torch.Tensor.backward,
    save: Callable[[], object] | None = None,
) -> None:
    """The loop. ``backward`` and ``save`` let the accelerate variant put its own in."""
    from tqdm import tqdm

    if save is None:
        save = functools.partial(save_checkpoint, args.checkpoint_dir, progress, ema)

    rank, n = dist.get_rank(), len(data.y_train)
    steps = total_steps(args, n)
    eval_every = args.eval_every or n // args.batch_size
    restarted = restart_count() > 0
    bar = tqdm(
        total=steps,
        initial=progress.step,
        disable=rank != 0,
        desc="train",
        unit="step",
        dynamic_ncols=True,
    )
    while progress.step < steps:
        step = progress.step
        if step == args.fail_at_step and not restarted and rank == dist.get_world_size() - 1:
            print(f"rank {rank}: dying before step {step} (--fail-at-step)", flush=True)
            os._exit(1)

        t0 = clock.now()
        idx = batch_indices(step, n, args.batch_size, args.seed)
        loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
        optimizer.zero_grad(set_to_none=True)
        backward(loss)
        optimizer.step()  # with --async: first waits for the previous update (the fence)
        t1 = clock.now()
        ema.update_parameters(model)  # every rank pushes its shards into the average
        t2 = clock.now()
        clock.add("train", t0, t2)
        clock.add("average", t1, t2)
        clock.steps += 1
        progress.step += 1

        if progress.step % eval_every == 0 or progress.step == steps:
            train_loss = loss.detach().clone()  # the global batch's: the same on every rank
            dist.all_reduce(train_loss)
            raw = evaluate(model, data.x_test, data.y_test)
            with ema.swapped(model):  # the live (sharded) model holds the average in here
                avg = evaluate(model, data.x_test, data.y_test)
            progress.history.append(
                {
                    "step": progress.step,
                    "train_loss": train_loss.item() / dist.get_world_size(),
                    "raw_acc": raw[0],
                    "raw_loss": raw[1],
                    "avg_acc": avg[0],
                    "avg_loss": avg[1],
                }
            )
            bar.set_postfix(raw=f"{raw[0]:.3f}", avg=f"{avg[0]:.3f}")
        if args.checkpoint_every and (
            progress.step % args.checkpoint_every == 0 or progress.step == steps
        ):
            save()
        bar.update(1)
    bar.close()
