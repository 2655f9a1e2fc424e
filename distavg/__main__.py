"""The ``distavg`` command (also ``python -m distavg``).

Subcommands:
    distavg bench [ARGS]            the benchmark (``distavg bench --help`` for its options)
    distavg export CKPT_DIR OUT     the average in a DCP checkpoint as one model file
    distavg --version
"""

from __future__ import annotations

import argparse
import sys

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
        "model.load_state_dict accepts: safetensors for *.safetensors, else torch.save.",
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
    from .export import export_checkpoint

    try:
        out = export_checkpoint(args.ckpt_dir, args.out, key=args.key, format=args.format)
    except (ValueError, ImportError) as e:
        print(f"distavg export: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
