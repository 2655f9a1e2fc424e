"""The reference job's parts, shared by ``launch/train.py`` and ``launch/train_accelerate.py``.

The package sits beside the scripts, so a script started by path (``torchrun
launch/train.py``, ``accelerate launch launch/train_accelerate.py``) imports it as ``job``.

    config        the flag table: the parser, --help and the checks
    distributed   the process group; torchrun's restarts
    data          the digits split and each rank's batch of a step
    model         the network, its DDP/FSDP2 wrapping and its average
    checkpoints   sharded saves that a kill never tears; one choice for every rank
    clock         time spent training and averaging (CUDA events on a GPU)
    loop          the training loop and the held-out evaluation
    report        metrics.json, heldout.png, average.pt and the summary printed
"""
