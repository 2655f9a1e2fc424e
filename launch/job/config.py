"""The job's flags: one table builds the parser, its ``--help`` and the checks.

Every flag is one :class:`Flag` row of :data:`FLAGS`. A rule parameter (``--momentum``,
``--half-life``, ...) lists the rules that take it with this job's default for each, so
what a rule takes, what ``--help`` shows and what :func:`rule_kwargs` passes all come from
that row. ``--help`` shows the defaults of the chosen rule (``--rule power --help`` shows
power's).
"""

from __future__ import annotations

import argparse
import inspect
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import distavg

from .checkpoints import latest_checkpoint
from .distributed import restart_count

RULES: dict[str, type[distavg.BaseAveragedModel]] = {
    "annealing": distavg.MomentumAnnealingEMA,
    "ema": distavg.ExponentialMovingAverage,
    "swa": distavg.StochasticWeightAverage,
    "warmup": distavg.WarmupEMA,
    "power": distavg.PowerEMA,
    "halflife": distavg.HalfLifeEMA,
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _positive(kind: type) -> Callable[[str], Any]:
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


@dataclass(frozen=True)
class Flag:
    """One command-line flag.

    Attributes:
        name: the flag without its dashes (``"batch-size"``).
        help: what it does; ``--help`` appends the default.
        default: the value when the flag is not given.
        type: parses the text given.
        choices: the values allowed.
        switch: a flag without a value (``store_true``).
        dest: the attribute of the parsed config, when not the name with underscores.
        shown: ``--help``'s words for a default that is not a value (None: derived).
        rules: for a rule parameter, the rules that take it and this job's default for each
            (None: the rule's own default, or unset where the rule has none).
    """

    name: str
    help: str
    default: Any = None
    type: Callable[[str], Any] | None = None
    choices: Sequence[str] | None = None
    switch: bool = False
    dest: str | None = None
    shown: str | None = None
    rules: Mapping[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return self.dest or self.name.replace("-", "_")

    @property
    def flag(self) -> str:
        return "--" + self.name


# The rule defaults suit a run of ~200 steps (the library's suit ~10^5): the annealing rule is
# the plain mean for the first 50 steps, then an EMA with weight 0.02 (a half-life of ~35
# steps), so the average forgets the random initialisation yet smooths over the label noise.
FLAGS: dict[str, tuple[Flag, ...]] = {
    "training": (
        Flag("parallel", "how the model is spread over the ranks", "ddp", choices=("ddp", "fsdp2")),
        Flag("device", "auto: a GPU per process where there are enough, else CPU", "auto",
             choices=("auto", "cpu", "cuda")),
        Flag("epochs", "passes over the training split", 10, _positive(int)),
        Flag("steps", "total optimizer steps, instead of --epochs", None, _positive(int),
             shown="from --epochs"),
        Flag("batch-size", "global, split over the ranks", 64, _positive(int)),
        Flag("lr", "learning rate of SGD (momentum 0.9), constant", 0.1, _positive(float)),
        Flag("hidden", "width of both hidden layers", 128, _positive(int)),
        Flag("label-noise", "fraction of training labels replaced by a random class", 0.2,
             _fraction),
        Flag("seed", "initial weights, label noise and data order", 0, int),
        Flag("eval-every", "steps between evaluations", None, _positive(int),
             shown="once an epoch"),
    ),
    "averaging": (
        Flag("rule", "the averaging rule", "annealing", choices=tuple(RULES)),
        Flag("momentum", "weight of the new value", type=float,
             rules={"annealing": 0.02, "ema": 0.02}),
        Flag("gamma", "annealing: w = max(momentum, gamma/(gamma+t)); "
             "power: the exponent, instead of --sigma-rel", type=float,
             rules={"annealing": 1, "power": None}),
        Flag("decay", "the largest decay", type=float, rules={"warmup": None}),
        Flag("inv-gamma", "warm-up time scale, in steps", type=float, rules={"warmup": None}),
        Flag("power", "warm-up exponent", type=float, rules={"warmup": None}),
        Flag("min-decay", "the smallest decay", type=float, rules={"warmup": None}),
        Flag("sigma-rel", "relative width of the averaging profile", type=float,
             rules={"power": 0.05}),
        Flag("half-life", "half-life, in steps", type=float, rules={"halflife": 35.0}),
        Flag("rampup", "ramp-up: the half-life is at most rampup * step; unset: none",
             type=float, rules={"halflife": None}),
        Flag("interval", "average every N steps", 1, _positive(int)),
        Flag("placement", "sharded: each rank keeps 1/world of the average; "
             "owner: rank 0 keeps all of it", "sharded", choices=("sharded", "owner")),
        Flag("offload", "keep the average in CPU memory", switch=True),
        Flag("dtype", "dtype of the average", choices=tuple(DTYPES), shown="the parameters'"),
        Flag("async", "overlap each update with the next forward/backward", switch=True,
             dest="async_update"),
    ),
    "checkpoints and faults": (
        Flag("checkpoint-dir", "where checkpoints go (the last two are kept)", type=Path,
             shown="none: no checkpoints"),
        Flag("checkpoint-every", "steps between checkpoints (and one at the end)",
             type=_positive(int), shown="never"),
        Flag("resume", "start from the latest checkpoint (a restarted attempt under "
             "torchrun --max-restarts always does)", switch=True),
        Flag("fail-at-step", "testing: the last rank dies before this step, on the first attempt",
             type=_positive(int), shown="never"),
        Flag("out", "metrics.json, heldout.png and average.pt go here", Path("runs/digits"),
             Path),
    ),
}  # fmt: skip
RULE_FLAGS = tuple(f for group in FLAGS.values() for f in group if f.rules)


def flag(name: str) -> Flag:
    return next(f for group in FLAGS.values() for f in group if f.name == name)


def rule_default(rule: str, f: Flag) -> Any:
    """This job's default for rule parameter ``f`` under ``rule``; None when it is unset."""
    value = f.rules[rule]
    if value is None:
        value = inspect.signature(RULES[rule]).parameters[f.key].default
    return value


def rule_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The chosen rule's keyword arguments: the flags given, over this job's defaults."""
    takes = [f for f in RULE_FLAGS if args.rule in f.rules]
    given = {f.key: getattr(args, f.key) for f in takes if getattr(args, f.key) is not None}
    defaults = {f.key: f.rules[args.rule] for f in takes}
    if args.rule == "power" and "gamma" in given:  # PowerEMA takes one of the two
        defaults["sigma_rel"] = None
    return {k: v for k, v in {**defaults, **given}.items() if v is not None}


def _shown(value: Any) -> str:
    if value is None or value is inspect.Parameter.empty:
        return "unset"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _help(f: Flag, rule: str) -> str:
    if f.switch:
        return f.help
    if not f.rules:
        return f"{f.help} (default: {f.shown or _shown(f.default)})"
    rules = ", ".join(f.rules)
    if rule in f.rules:
        return f"{f.help} (rules: {rules}; default: {_shown(rule_default(rule, f))})"
    return f"{f.help} (rules: {rules}; not used by --rule {rule})"


def build_parser(
    *, prog: str = "train.py", rule: str | None = None, unused: Sequence[str] = ()
) -> argparse.ArgumentParser:
    """The parser, its ``--help`` showing ``rule``'s defaults (default: the default rule).

    Flags named in ``unused`` are accepted only to be refused by :func:`parse_args`.
    """
    rule = rule or flag("rule").default
    p = argparse.ArgumentParser(
        prog=prog,
        description="Train an MLP on the digits data with a running average of its weights.",
        epilog=f"Rule flags show the defaults of --rule {rule}; "
        f"--rule NAME --help shows another rule's.",
    )
    for title, flags in FLAGS.items():
        g = p.add_argument_group(title)
        for f in flags:
            if f.name in unused:
                g.add_argument(f.flag, dest=f.key, help=argparse.SUPPRESS)
            elif f.switch:
                g.add_argument(f.flag, dest=f.key, action="store_true", help=_help(f, rule))
            else:
                g.add_argument(
                    f.flag,
                    dest=f.key,
                    type=f.type,
                    choices=f.choices,
                    default=f.default,
                    help=_help(f, rule),
                )
    return p


def parse_args(
    argv: list[str] | None = None,
    *,
    prog: str = "train.py",
    unused: Mapping[str, str] | None = None,
) -> argparse.Namespace:
    """The config; a bad flag exits with argparse's usage error (status 2).

    Args:
        argv: the command line (default: ``sys.argv[1:]``).
        prog: the script's name in messages.
        unused: flags this script refuses, each with the reason.
    """
    unused = unused or {}
    p = build_parser(prog=prog, rule=_chosen_rule(argv), unused=tuple(unused))
    args = p.parse_args(argv)
    for name, why in unused.items():
        if getattr(args, flag(name).key) is not None:
            p.error(f"--{name} is not used by {prog}: {why}")
    _check(p, args)
    return args


def _chosen_rule(argv: list[str] | None) -> str | None:
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--rule")
    rule = pre.parse_known_args(argv)[0].rule
    return rule if rule in RULES else None  # a bad name: the parser itself reports it


def _check(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for f in RULE_FLAGS:
        if getattr(args, f.key) is not None and args.rule not in f.rules:
            takes = [g.flag for g in RULE_FLAGS if args.rule in g.rules]
            p.error(
                f"{f.flag} does not apply to --rule {args.rule} "
                f"(it takes: {', '.join(takes) or 'nothing'})"
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
