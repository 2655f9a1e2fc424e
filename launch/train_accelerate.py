"""The reference job (``launch/train.py``) under Hugging Face accelerate.

    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 \\
        launch/train_accelerate.py
    accelerate launch --config_file launch/accelerate/gpu_ddp.yaml launch/train_accelerate.py
    accelerate launch --config_file launch/accelerate/fsdp2.yaml launch/train_accelerate.py

Same flags as ``train.py`` except ``--parallel`` and ``--device``: the accelerate config
(``launch/accelerate/*.yaml``) picks DDP or FSDP2, CPU or GPU.
What differs from ``train.py`` is only the plumbing accelerate owns: ``prepare`` wraps the
model, ``accelerator.backward`` runs backward, ``save_state``/``load_state`` write and
read checkpoints. The average joins those with two lines::

    from distavg.integrations.accelerate import register_for_checkpointing
    register_for_checkpointing(accelerator, ema)

(accelerate's own ``register_for_checkpointing`` would save rank 0's shard only.)
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist
from job import checkpoints
from job.clock import Clock
from job.config import parse_args
from job.data import load_data
from job.distributed import restart_count
from job.loop import train
from job.model import build_average, build_optimizer, mlp
from job.report import report


class Counter:
    """The step and the evaluation history: identical on every rank, so accelerate's
    rank-0 ``register_for_checkpointing`` is right for it."""

    def __init__(self) -> None:
        self.step = 0
        self.history: list[dict[str, float]] = []

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "history": self.history}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.step, self.history = int(sd["step"]), list(sd["history"])


def main(argv: list[str] | None = None) -> None:
    from accelerate import Accelerator

    from distavg.integrations.accelerate import register_for_checkpointing

    picked = "the accelerate config picks it"
    args = parse_args(
        argv, prog="train_accelerate.py", unused={"parallel": picked, "device": picked}
    )

    # 1. accelerate sets up the processes; one process still gets a group of one
    accelerator = Accelerator()
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    if dist.get_world_size() != accelerator.num_processes:
        # The processes share a process group but accelerate treats each as a job of its
        # own: prepare() would not wrap the model, and the ranks would train apart.
        raise SystemExit(
            f"accelerate started {dist.get_world_size()} processes but sees "
            f"{accelerator.num_processes} (distributed_type "
            f"{accelerator.distributed_type.value}); on CPU set ACCELERATE_USE_CPU=1 and "
            f"launch with --multi_gpu or --config_file launch/accelerate/cpu.yaml"
        )
    args.parallel = accelerator.distributed_type.value.lower()

    # 2. data, model, optimizer (prepared by accelerate), the average
    data = load_data(args.seed, args.label_noise, accelerator.device)
    model = mlp(args.hidden, args.seed)
    optimizer = build_optimizer(args, model)
    model, optimizer = accelerator.prepare(model, optimizer)
    clock = Clock(optimizer, accelerator.device)
    ema = build_average(args, model, optimizer)
    clock.after_averager_built(optimizer)
    register_for_checkpointing(accelerator, ema)  # every rank's shard, through DCP
    progress = Counter()
    accelerator.register_for_checkpointing(progress)

    # 3. resume
    if args.checkpoint_dir and (args.resume or restart_count() > 0):
        found = checkpoints.choose_checkpoint(args.checkpoint_dir)
        if found is not None:
            accelerator.load_state(str(found))
            accelerator.print(f"resumed from {found} at step {progress.step}")

    def save() -> None:  # committed as train.py's are: see job/checkpoints.py
        checkpoints.save(
            args.checkpoint_dir, progress.step, lambda path: accelerator.save_state(str(path))
        )

    # 4. train; 5. report and close
    train(
        args, data, model, optimizer, ema, progress, clock,
        backward=accelerator.backward, save=save,
    )  # fmt: skip
    report(args, ema, progress, clock, len(data.y_test))
    ema.close()  # waits for the last update, stops the worker, removes the fence
    accelerator.wait_for_everyone()
    accelerator.end_training()  # destroys accelerate's process group
    if dist.is_initialized():  # the group of one made above
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
