"""The ``distavg`` command (also ``python -m distavg``).

Subcommands:
    distavg bench [ARGS]            the benchmark (``distavg bench --help`` for its options)
    distavg export CKPT_DIR OUT     the average in a DCP checkpoint as one model file
    distavg --version
"""

from __future__ import annotations

import argparse
import sys
import warnings

from . import __version__


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="distavg",
        description="Sharded, asynchronous weight averaging for distributed PyTorch training.",
    )
    p.add_argument("--version", action="version", version=f"distavg {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    # The benchmark parses its own arguments (and prints its own --help).
    sub.add_parser(
        "bench",
        help="time the update, the overlap and checkpoints (see distavg bench --help)",
        add_help=False,
    )
    export = sub.add_parser(
        "export",
        help="write the average in a DCP checkpoint as one model file, offline",
        description="Read the average saved under KEY in a torch.distributed.checkpoint "
        "directory (any world size wrote it) and write it as a file that a plain "
        "model.load_state_dict accepts: safetensors for *.safetensors, torch.save for "
        "*.pt, *.pth and *.bin. The checkpoint is checked against its checksums and read "
        "without running code from it; OUT is replaced only once completely written.",
    )
    export.add_argument("ckpt_dir", metavar="CKPT_DIR", help="the DCP checkpoint directory")
    export.add_argument("out", metavar="OUT", help="the model file to write")
    export.add_argument("--key", default="ema", help="the key the average was saved under")
    export.add_argument(
        "--format", choices=("safetensors", "torch"), help="default: from OUT's suffix"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the command line ``argv`` (default: ``sys.argv[1:]``); return the exit status."""
    p = _parser()
    args, rest = p.parse_known_args(argv)
    if args.command == "bench":
        from .bench import main as bench_main

        return int(bench_main(rest) or 0)
    if rest:
        p.error(f"unrecognized arguments: {' '.join(rest)}")
    return _export(args)


def _export(args: argparse.Namespace) -> int:
    """``distavg export``: every failure is one line on stderr and exit status 1."""
    from .export import export_checkpoint

    error = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            out = export_checkpoint(args.ckpt_dir, args.out, key=args.key, format=args.format)
        except Exception as e:  # the message is the report; a traceback would bury it
            known = isinstance(e, ValueError | ImportError | OSError)
            error = str(e) if known else f"{type(e).__name__}: {e}"
    for w in caught:
        if not str(w.message).startswith("torch.distributed is disabled"):
            _say("warning", str(w.message))
    if error is not None:
        _say("error", error)
        return 1
    print(f"wrote {out}")
    return 0


def _say(level: str, message: str) -> None:
    line = " ".join(part.strip() for part in message.splitlines() if part.strip())
    print(f"distavg export: {level}: {line}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
