"""The reference job: train a small network on real data and keep a running average of it.

    torchrun --standalone --nproc-per-node 2 launch/train.py

trains an MLP (two hidden layers) on scikit-learn's bundled digits (8x8 images of
handwritten digits, shipped inside the package: no download) with DDP or FSDP2 on CPUs
(gloo) or GPUs (NCCL), keeps an EMA of its weights sharded across the ranks, and evaluates
the raw model and the average on a held-out split. It writes ``metrics.json`` and ``heldout.png`` to ``--out`` and prints
both models' held-out accuracy and loss and what averaging cost per step.

The default corrupts 20% of the *training* labels (the held-out labels are never touched)
and trains with a constant learning rate: the regime where averaging pays, because the
raw weights keep chasing the noisy labels while the average smooths over them.

Read ``main()`` first: parse the config, build, (resume,) train, report, close.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.checkpoint.stateful import Stateful
from torch.nn import functional as F

import distavg

# -- the config ---------------------------------------------------------------------------

# Each rule, the flags it takes, and this job's defaults for them. Giving a flag the chosen
# rule does not take is an error rather than a silently ignored setting. The defaults suit a
# run of ~200 steps (the library's suit ~10^5): the annealing rule is the plain mean for the
# first 50 steps, then an EMA with weight 0.02 (a half-life of ~35 steps), so the average
# forgets the random initialisation yet smooths over the label noise.
RULES: dict[str, tuple[type, dict[str, Any]]] = {
    "annealing": (distavg.MomentumAnnealingEMA, {"momentum": 0.02, "gamma": 1}),
    "ema": (distavg.ExponentialMovingAverage, {"momentum": 0.02}),
    "swa": (distavg.StochasticWeightAverage, {}),
    "warmup": (
        distavg.WarmupEMA,
        {"decay": None, "inv_gamma": None, "power": None, "min_decay": None},
    ),
    "power": (distavg.PowerEMA, {"sigma_rel": 0.05, "gamma": None}),
    "halflife": (distavg.HalfLifeEMA, {"half_life": 35.0, "rampup": None}),
}
RULE_PARAMS = (
    "momentum",
    "gamma",
    "decay",
    "inv_gamma",
    "power",
    "min_decay",
    "sigma_rel",
    "half_life",
    "rampup",
)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train.py",
        description="Train an MLP on the digits data with a running average of its weights.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("training")
    g.add_argument("--parallel", choices=("ddp", "fsdp2"), default="ddp")
    g.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="auto: a GPU per process where there are enough, else CPU",
    )
    g.add_argument("--epochs", type=_positive(int), default=10)
    g.add_argument(
        "--steps", type=_positive(int), help="total optimizer steps (overrides --epochs)"
    )
    g.add_argument("--batch-size", type=_positive(int), default=64, help="global, split over ranks")
    g.add_argument("--lr", type=_positive(float), default=0.1)
    g.add_argument("--hidden", type=_positive(int), default=128)
    g.add_argument(
        "--label-noise",
        type=_fraction,
        default=0.2,
        help="fraction of training labels replaced by a random class",
    )
    g.add_argument("--seed", type=int, default=0)
    g.add_argument(
        "--eval-every",
        type=_positive(int),
        help="steps between evaluations (default: once an epoch)",
    )

    g = p.add_argument_group("averaging")
    g.add_argument("--rule", choices=tuple(RULES), default="annealing")
    g.add_argument(
        "--momentum", type=float, help="annealing, ema: weight of the new value (default 0.02)"
    )
    g.add_argument(
        "--gamma",
        type=float,
        help="annealing: w = max(momentum, gamma/(gamma+t)) "
        "(default 1); power: the exponent, instead of --sigma-rel",
    )
    g.add_argument("--decay", type=float, help="warmup: the largest decay")
    g.add_argument("--inv-gamma", type=float, help="warmup: warm-up time scale")
    g.add_argument("--power", type=float, help="warmup: warm-up exponent")
    g.add_argument("--min-decay", type=float, help="warmup: the smallest decay")
    g.add_argument("--sigma-rel", type=float, help="power: relative width (default 0.05)")
    g.add_argument("--half-life", type=float, help="halflife: in steps (default 35)")
    g.add_argument("--rampup", type=float, help="halflife: ramp-up ratio")
    g.add_argument("--interval", type=_positive(int), default=1, help="average every N steps")
    g.add_argument("--placement", choices=("sharded", "owner"), default="sharded")
    g.add_argument("--offload", action="store_true", help="keep the average in CPU memory")
    g.add_argument(
        "--dtype", choices=tuple(DTYPES), help="dtype of the average (default: the parameters')"
    )
    g.add_argument(
        "--async",
        dest="async_update",
        action="store_true",
        help="overlap each update with the next forward/backward",
    )

    g = p.add_argument_group("checkpoints and faults")
    g.add_argument("--checkpoint-dir", type=Path)
    g.add_argument("--checkpoint-every", type=_positive(int), help="steps between checkpoints")
    g.add_argument(
        "--resume",
        action="store_true",
        help="start from the latest checkpoint "
        "(a restarted attempt under torchrun --max-restarts always does)",
    )
    g.add_argument(
        "--fail-at-step",
        type=_positive(int),
        metavar="K",
        help="testing: the last rank dies before step K on the first attempt",
    )
    g.add_argument(
        "--out",
        type=Path,
        default=Path("runs/digits"),
        help="metrics.json, heldout.png and average.pt go here",
    )

    return p


def parse_args(
    argv: list[str] | None = None, p: argparse.ArgumentParser | None = None
) -> argparse.Namespace:
    """The config; a bad flag exits with argparse's usage error (status 2)."""
    p = p or parser()
    args = p.parse_args(argv)
    _check_args(p, args)
    return args


def _check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    takes = RULES[args.rule][1]
    for name in RULE_PARAMS:
        if getattr(args, name) is not None and name not in takes:
            flag = "--" + name.replace("_", "-")
            p.error(
                f"{flag} does not apply to --rule {args.rule} (it takes: "
                f"{', '.join('--' + t.replace('_', '-') for t in takes) or 'nothing'})"
            )
    local_world, gpus = int(os.environ.get("LOCAL_WORLD_SIZE", 1)), torch.cuda.device_count()
    if args.device == "cuda" and gpus < local_world:
        p.error(f"--device cuda needs a GPU per process: {local_world} here, {gpus} GPUs")
    world = int(os.environ.get("WORLD_SIZE", 1))
    if args.batch_size % world:
        p.error(f"--batch-size {args.batch_size} must be a multiple of the {world} ranks")
    if (args.checkpoint_every or args.resume) and args.checkpoint_dir is None:
        p.error("--checkpoint-every and --resume need --checkpoint-dir")
    if args.checkpoint_dir and not args.resume and restart_count() == 0:
        found = latest_checkpoint(args.checkpoint_dir)
        if found is not None:  # a fresh run would mix its checkpoints with these
            p.error(
                f"--checkpoint-dir {args.checkpoint_dir} already holds {found.name}: "
                f"pass --resume to continue from it, or name an empty directory"
            )


def _positive(kind: type) -> Any:
    def parse(text: str) -> Any:
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its "invalid int" message
    return parse


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


# -- building -----------------------------------------------------------------------------


def setup_distributed(args: argparse.Namespace) -> torch.device:
    """One process group for the job: NCCL for GPUs (plus gloo for CPU tensors), gloo on CPU.

    Started without torchrun, the job is a group of one.
    """
    # auto: GPUs when every process on this node gets one of its own, else the CPUs
    gpus, local_world = torch.cuda.device_count(), int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if args.device == "cuda" or (args.device == "auto" and gpus >= local_world):
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        backend = "cpu:gloo,cuda:nccl"  # gloo for an offloaded (CPU) average's checkpoints
    else:
        device, backend = torch.device("cpu"), "gloo"
    device_id = device if device.type == "cuda" else None
    if "RANK" not in os.environ:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    elif restart_count() and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # torchrun hands every attempt the same rendezvous store; a restarted attempt would
        # read the previous attempt's keys and connect to ranks that are gone (pytorch
        # issue 135712). Keys of our own per attempt keep the attempts apart.
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]))
        dist.init_process_group(
            backend,
            store=dist.PrefixStore(f"attempt-{restart_count()}", store),
            rank=int(os.environ["RANK"]),
            world_size=int(os.environ["WORLD_SIZE"]),
            device_id=device_id,
        )
    else:
        dist.init_process_group(backend, device_id=device_id)
    return device


def restart_count() -> int:
    """How many times torchrun (``--max-restarts``) has restarted this job."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))


@dataclass
class Data:
    x_train: torch.Tensor
    y_train: torch.Tensor  # with --label-noise of its labels replaced
    x_test: torch.Tensor
    y_test: torch.Tensor  # held out: never trained on, never noised, never used to choose


def load_data(args: argparse.Namespace, device: torch.device) -> Data:
    """The digits, split 70/30 by a fixed permutation, standardised with training statistics."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(12345).permutation(len(y))  # fixed: the split never moves
    cut = int(0.7 * len(y))
    train, test = order[:cut], order[cut:]
    mean, std = x[train].mean(0), x[train].std(0) + 1.0
    x = ((x - mean) / std).astype(np.float32)
    y_train = y[train].copy()
    rng = np.random.default_rng(args.seed)
    noisy = rng.random(len(y_train)) < args.label_noise
    y_train[noisy] = rng.integers(0, 10, int(noisy.sum()))

    def t(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).to(device)

    return Data(t(x[train]), t(y_train), t(x[test]), t(y[test]))


def mlp(args: argparse.Namespace) -> nn.Sequential:
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    return nn.Sequential(
        nn.Linear(64, args.hidden),
        nn.ReLU(),
        nn.Linear(args.hidden, args.hidden),
        nn.ReLU(),
        nn.Linear(args.hidden, 10),
    )


def build_model(args: argparse.Namespace, device: torch.device) -> nn.Module:
    model = mlp(args).to(device)
    if args.parallel == "ddp":
        return nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def build_average(
    args: argparse.Namespace, model: nn.Module, optimizer: torch.optim.Optimizer
) -> distavg.BaseAveragedModel:
    """The averager: one line in a user's own job (``ExponentialMovingAverage(model, ...)``)."""
    cls, defaults = RULES[args.rule]
    given = {k: getattr(args, k) for k in defaults if getattr(args, k) is not None}
    if args.rule == "power" and "gamma" in given:  # PowerEMA takes one of the two
        defaults = {**defaults, "sigma_rel": None}
    rule = {k: v for k, v in {**defaults, **given}.items() if v is not None}
    return cls(
        model,
        **rule,
        interval=args.interval,
        device="cpu" if args.offload else None,
        placement=args.placement,
        dtype=DTYPES[args.dtype] if args.dtype else None,
        async_update=args.async_update,
        optimizer=optimizer,  # the fence for --async; and no update after a skipped step
    )


# -- checkpoints --------------------------------------------------------------------------


class Progress(Stateful):
    """What a resumed run needs, besides the average, to continue exactly: the model, the
    optimizer, the step and the evaluations so far.

    The data order is a function of (seed, step), so the step count restores it.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = model, optimizer
        self.step = 0
        self.history: list[dict[str, float]] = []

    def state_dict(self) -> dict[str, Any]:
        # get_state_dict gives DDP and FSDP2 the same keys; FSDP2 tensors stay sharded.
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        return {
            "model": model_sd,
            "optim": optim_sd,
            "step": self.step,
            "history": json.dumps(self.history),
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        set_state_dict(
            self.model, self.optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"]
        )
        self.step = int(sd["step"])
        self.history = json.loads(sd["history"])


def save_checkpoint(root: Path, progress: Progress, ema: distavg.BaseAveragedModel) -> None:
    """Every rank writes its own shards of the model, optimizer and average (no gather)."""
    dcp.save({"train": progress, "ema": ema}, checkpoint_id=root / f"step-{progress.step:06d}")
    dist.barrier()
    if dist.get_rank() == 0:  # keep the last two
        for old in _checkpoints(root)[:-2]:
            for f in old.iterdir():
                f.unlink()
            old.rmdir()


def latest_checkpoint(root: Path) -> Path | None:
    found = _checkpoints(root)
    return found[-1] if found else None


def _checkpoints(root: Path) -> list[Path]:
    # DCP writes .metadata last: a directory without it is a save cut short by a failure.
    return sorted(p.parent for p in root.glob("step-*/.metadata"))


# -- training -----------------------------------------------------------------------------


def batch_indices(step: int, n: int, args: argparse.Namespace) -> torch.Tensor:
    """This rank's slice of the global batch at ``step``: a pure function of (seed, step)."""
    per_epoch = n // args.batch_size
    epoch, i = divmod(step, per_epoch)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(args.seed * 100003 + epoch))
    batch = order[i * args.batch_size : (i + 1) * args.batch_size]
    return batch.chunk(dist.get_world_size())[dist.get_rank()]


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) on the whole held-out split, the same on every rank."""
    logits = model(x)
    acc = (logits.argmax(1) == y).float().mean().item()
    return acc, F.cross_entropy(logits, y).item()


class Clock:
    """Wall time per step spent training and spent averaging.

    Averaging time is the time the loop waits for averaging: the ``update_parameters``
    call plus, with ``--async``, the wait at the fence in the next ``optimizer.step()``
    (the part of the update the next forward/backward did not hide). The fence is a step
    pre-hook the averager installs; two more pre-hooks, one registered before it and one
    after, time exactly that wait. The hidden part still needs a core: where every core
    is busy training, it shows up as slower forward/backward, so compare the step times.
    """

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.train = self.average = 0.0
        self.steps = 0
        self._fence_start = 0.0
        _inner(optimizer).register_step_pre_hook(self._before_fence)

    def after_averager_built(self, optimizer: torch.optim.Optimizer) -> None:
        _inner(optimizer).register_step_pre_hook(self._after_fence)

    def _before_fence(self, *_: Any) -> None:
        self._fence_start = time.perf_counter()

    def _after_fence(self, *_: Any) -> None:
        self.average += time.perf_counter() - self._fence_start

    def per_step_ms(self) -> tuple[float, float]:
        n = max(self.steps, 1)
        return 1e3 * self.train / n, 1e3 * self.average / n


def _inner(optimizer: Any) -> torch.optim.Optimizer:
    # accelerate's AcceleratedOptimizer wraps the torch optimizer, whose step() it calls.
    return getattr(optimizer, "optimizer", optimizer)


def total_steps(args: argparse.Namespace, n_train: int) -> int:
    return args.steps or args.epochs * (n_train // args.batch_size)


def train(
    args: argparse.Namespace,
    data: Data,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    ema: distavg.BaseAveragedModel,
    progress: Progress,
    clock: Clock,
    *,
    backward: Callable[[torch.Tensor], None] = torch.Tensor.backward,
    save: Callable[[], None] | None = None,
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

        t0 = time.perf_counter()
        idx = batch_indices(step, n, args)
        loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
        optimizer.zero_grad(set_to_none=True)
        backward(loss)
        optimizer.step()  # with --async: first waits for the previous update (the fence)
        t1 = time.perf_counter()
        ema.update_parameters(model)  # every rank pushes its shards into the average
        t2 = time.perf_counter()
        clock.train += t2 - t0
        clock.average += t2 - t1
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


# -- reporting ----------------------------------------------------------------------------


def report(
    args: argparse.Namespace,
    ema: distavg.BaseAveragedModel,
    progress: Progress,
    clock: Clock,
    n_test: int,
) -> dict[str, Any]:
    """Writes metrics.json, heldout.png and average.pt (the whole average) on rank 0."""
    average = ema.full_state_dict()  # a collective: every rank calls it; rank 0 gets it all
    if dist.get_rank() != 0:
        return {}
    args.out.mkdir(parents=True, exist_ok=True)
    torch.save(average, args.out / "average.pt")
    train_ms, average_ms = clock.per_step_ms()
    final = progress.history[-1]
    metrics = {
        "world_size": dist.get_world_size(),
        "backend": str(dist.get_backend()),
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "averager": repr(ema),
        "steps": progress.step,
        "heldout_samples": n_test,
        "final": {
            "raw": {"acc": final["raw_acc"], "loss": final["raw_loss"]},
            "averaged": {"acc": final["avg_acc"], "loss": final["avg_loss"]},
        },
        "ms_per_step": {
            "train": train_ms,
            "averaging": average_ms,
            "measured_over_steps": clock.steps,
        },
        "average_bytes_per_rank": ema.shards.nbytes,
        "average_sha256": state_hash(average),
        "history": progress.history,
    }
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    plot(
        progress.history,
        args.out / "heldout.png",
        title=f"{args.rule}, {args.parallel}, "
        f"{dist.get_world_size()} ranks, label noise {args.label_noise:g}",
    )
    mode = "async" if args.async_update else "sync"
    print(f"\n{'held-out (' + str(n_test) + ' samples)':<26}{'accuracy':>10}{'loss':>10}")
    print(f"{'raw model':<26}{final['raw_acc']:>10.4f}{final['raw_loss']:>10.4f}")
    print(
        f"{'averaged (' + args.rule + ')':<26}{final['avg_acc']:>10.4f}{final['avg_loss']:>10.4f}"
    )
    print(
        f"averaging overhead: {average_ms:.3f} ms/step ({mode}) of {train_ms:.3f} ms/step "
        f"training; average holds {ema.shards.nbytes / 1024:.1f} KiB on rank 0"
    )
    print(f"wrote {args.out / 'metrics.json'}, {args.out / 'heldout.png'}")
    return metrics


def state_hash(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(state):
        h.update(key.encode())
        h.update(state[key].detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def plot(history: list[dict[str, float]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in (
        (ax_acc, "acc", "held-out accuracy"),
        (ax_loss, "loss", "held-out loss"),
    ):
        ax.plot(steps, [h[f"raw_{key}"] for h in history], "o-", ms=3, label="raw model")
        ax.plot(steps, [h[f"avg_{key}"] for h in history], "o-", ms=3, label="averaged")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- the job ------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    # 1. config and process group
    args = parse_args(argv)
    device = setup_distributed(args)

    # 2. data, model, optimizer, the average
    data = load_data(args, device)
    model = build_model(args, device)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    clock = Clock(optimizer)
    ema = build_average(args, model, optimizer)
    clock.after_averager_built(optimizer)
    progress = Progress(model, optimizer)

    # 3. resume: explicitly, or whenever torchrun restarted this job after a failure
    if args.checkpoint_dir and (args.resume or restart_count() > 0):
        found = latest_checkpoint(args.checkpoint_dir)
        if found is not None:
            dcp.load({"train": progress, "ema": ema}, checkpoint_id=found)
            if dist.get_rank() == 0:
                print(f"resumed from {found} at step {progress.step}", flush=True)

    # 4. train, evaluating the raw model and the average on the held-out split
    train(args, data, model, optimizer, ema, progress, clock)

    # 5. report and close
    report(args, ema, progress, clock, len(data.y_test))
    ema.close()  # waits for the last update, stops the worker, removes the fence
    dist.barrier()  # before destroy_process_group, or gloo may abort at exit
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
