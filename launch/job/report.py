"""What the job leaves: metrics.json, heldout.png, average.pt, and the summary it prints."""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import distavg

from .checkpoints import committed
from .clock import Clock
from .loop import Steps


def report(
    args: argparse.Namespace,
    ema: distavg.BaseAveragedModel,
    progress: Steps,
    clock: Clock,
    n_test: int,
) -> dict[str, Any]:
    """Writes metrics.json, heldout.png and average.pt (the whole average) on rank 0.

    A collective: every rank calls it. Returns the metrics on rank 0, ``{}`` elsewhere.
    """
    average = ema.full_state_dict()  # a collective: every rank calls it; rank 0 gets it all
    train_ms, average_ms = clock.per_step_ms()  # every rank: a GPU clock reads its events
    if dist.get_rank() != 0:
        return {}
    args.out.mkdir(parents=True, exist_ok=True)
    files = {name: args.out / name for name in ("metrics.json", "heldout.png", "average.pt")}
    torch.save(average, files["average.pt"])
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
    files["metrics.json"].write_text(json.dumps(metrics, indent=2) + "\n")
    plot(
        progress.history,
        files["heldout.png"],
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
    written = [str(path) for path in files.values()]
    if args.checkpoint_every:
        written += [f"{path}/" for path in committed(args.checkpoint_dir)]
    print(f"wrote {', '.join(written)}", flush=True)
    return metrics


def state_hash(state: dict[str, torch.Tensor]) -> str:
    """sha256 over the keys and the bytes of the tensors, in key order."""
    h = hashlib.sha256()
    for key in sorted(state):
        h.update(key.encode())
        h.update(state[key].detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def plot(history: list[dict[str, float]], path: Path, title: str) -> None:
    """Held-out accuracy and loss of the raw model and the average, per evaluation."""
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
