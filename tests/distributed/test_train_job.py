"""The training job (launch/train.py) as users start it: torchrun, accelerate, the scripts.

Each run is a real subprocess with 2 gloo ranks (2-7 s each here, mostly start-up), so the
runs are short:
  * the default job, end to end, exactly as the README starts it;
  * every parallel x placement x sync/async combination (eight runs); the other averaging
    flags (rule, offload, dtype, interval) ride along, and each run checkpoints, so the
    sharded DCP save of the job runs under every parallel/placement pair;
  * a rank killed mid-run and restarted by torchrun resumes and ends with the average of
    the uninterrupted run, bit for bit;
  * the accelerate spelling, and the multi-node script with two "nodes" on this machine.
The checkpoint rules (order by step, commit marker, one choice for every rank) are checked
on directories made by hand, and on 2 spawned gloo ranks where the ranks see different ones.
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from dist_utils import run_distributed

from distavg.export import export_checkpoint

ROOT = Path(__file__).resolve().parents[2]
TRAIN = ROOT / "launch" / "train.py"
TRAIN_ACCELERATE = ROOT / "launch" / "train_accelerate.py"
SINGLE_NODE = ROOT / "launch" / "run_single_node.sh"
MULTI_NODE = ROOT / "launch" / "run_multi_node.sh"

# The job's package sits beside its scripts, which find it as their own directory.
sys.path.insert(0, str(TRAIN.parent))
from job import checkpoints, config  # noqa: E402
from job.clock import Clock  # noqa: E402
from job.model import mlp  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TORCHELASTIC_")}
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHON"] = sys.executable  # the launch scripts' interpreter
    return env


def _run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> tuple[str, str]:
    """(stdout, stdout and stderr) of a command that must succeed."""
    try:
        r = subprocess.run(
            cmd, cwd=cwd, env=env or _env(), capture_output=True, text=True, timeout=300
        )
    except subprocess.TimeoutExpired as e:  # say where it hung
        tail = "".join(
            x.decode() if isinstance(x, bytes) else x or "" for x in (e.stdout, e.stderr)
        )
        raise AssertionError(f"{' '.join(cmd)} hung for 300 s:\n{tail[-6000:]}") from None
    out = r.stdout + r.stderr
    assert r.returncode == 0, f"{' '.join(cmd)} failed ({r.returncode}):\n{out[-6000:]}"
    return r.stdout, out


def torchrun(args: list[str], cwd: Path, *, restarts: int = 0) -> tuple[str, str]:
    return _run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "--max-restarts", str(restarts), str(TRAIN), *args],
        cwd,
    )  # fmt: skip


def metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


def written(stdout: str) -> list[Path]:
    """The files the job's last line says it wrote."""
    last = stdout.strip().splitlines()[-1]
    assert last.startswith("wrote "), last
    return [Path(p) for p in last.removeprefix("wrote ").split(", ")]


def assert_average_file_is_the_checkpoint(out: Path, ckpt: Path) -> None:
    """average.pt (gathered at the end) equals the last checkpoint's average, exported offline."""
    saved = torch.load(out / "average.pt")
    exported = export_checkpoint(ckpt, out / "exported.pt")
    again = torch.load(exported)
    assert saved.keys() == again.keys()
    for k in saved:
        assert torch.equal(saved[k], again[k]), k
    args = config.parse_args([])
    mlp(args.hidden, args.seed).load_state_dict(saved)  # a plain model takes it as it is


def assert_step_times_are_measured(m: dict, log: str) -> None:
    """Finite; averaging is a part of the step; the summary printed is what metrics.json holds."""
    train_ms, average_ms = m["ms_per_step"]["train"], m["ms_per_step"]["averaging"]
    assert math.isfinite(train_ms) and math.isfinite(average_ms)
    assert 0 < average_ms < train_ms
    assert m["ms_per_step"]["measured_over_steps"] == m["steps"]
    printed = re.search(
        r"^averaging overhead: ([\d.]+) ms/step \(\w+\) of ([\d.]+) ms/step", log, re.M
    )
    assert printed, log[-3000:]
    assert float(printed[1]) == pytest.approx(average_ms, abs=6e-4)
    assert float(printed[2]) == pytest.approx(train_ms, abs=6e-4)


# -- the default job --------------------------------------------------------------------


def test_default_job_trains_evaluates_and_writes_metrics_and_plot(tmp_path: Path) -> None:
    stdout, log = torchrun([], cwd=tmp_path)  # no flags at all: the README's quick start

    out = tmp_path / "runs" / "digits"
    m = metrics(out)
    assert m["world_size"] == 2 and m["backend"] == "gloo"
    assert m["config"]["parallel"] == "ddp" and m["config"]["rule"] == "annealing"
    assert m["steps"] == 190 and len(m["history"]) == 10  # 10 epochs of 1257 // 64 steps
    assert m["heldout_samples"] == 540
    raw, avg = m["final"]["raw"], m["final"]["averaged"]
    # The defaults were chosen (on a validation split of the training data) so that the
    # average wins; this is the held-out result the README reports.
    assert avg["acc"] > raw["acc"] and avg["loss"] < raw["loss"]
    assert_step_times_are_measured(m, log)
    png = (out / "heldout.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    assert re.search(rf"^raw model +{raw['acc']:.4f} +{raw['loss']:.4f}$", log, re.M)
    assert re.search(rf"^averaged \(annealing\) +{avg['acc']:.4f} +{avg['loss']:.4f}$", log, re.M)
    assert "ms/step (sync)" in log
    # The last line names every file the job wrote.
    assert {tmp_path / p for p in written(stdout)} == set(out.iterdir())


# -- every parallel x placement x mode combination -------------------------------------

COMBOS = {
    "ddp-sharded-sync": ["--parallel", "ddp", "--placement", "sharded", "--rule", "ema",
                         "--momentum", "0.1"],
    "ddp-owner-async": ["--parallel", "ddp", "--placement", "owner", "--async", "--offload",
                        "--rule", "swa", "--interval", "2"],
    "fsdp2-sharded-async": ["--parallel", "fsdp2", "--placement", "sharded", "--async",
                            "--rule", "warmup", "--decay", "0.9"],
    "fsdp2-owner-sync": ["--parallel", "fsdp2", "--placement", "owner", "--rule", "halflife",
                         "--half-life", "4", "--dtype", "bfloat16"],
    "ddp-sharded-async": ["--parallel", "ddp", "--placement", "sharded", "--async",
                          "--rule", "power", "--sigma-rel", "0.1"],
    "ddp-owner-sync": ["--parallel", "ddp", "--placement", "owner", "--rule", "annealing",
                       "--interval", "3"],
    "fsdp2-sharded-sync": ["--parallel", "fsdp2", "--placement", "sharded", "--offload",
                           "--rule", "ema", "--momentum", "0.05"],
    "fsdp2-owner-async": ["--parallel", "fsdp2", "--placement", "owner", "--async",
                          "--rule", "annealing", "--momentum", "0.05"],
}  # fmt: skip
SHORT = ["--steps", "6", "--eval-every", "3", "--checkpoint-every", "3"]


@pytest.mark.parametrize("name", list(COMBOS))
def test_each_parallel_placement_and_mode_pair_trains_and_checkpoints(
    tmp_path: Path, name: str
) -> None:
    parallel, placement, mode = name.split("-")
    out, ckpt = tmp_path / "out", tmp_path / "ckpt"
    stdout, log = torchrun(
        [*COMBOS[name], *SHORT, "--checkpoint-dir", str(ckpt), "--out", str(out)], tmp_path
    )

    m = metrics(out)
    assert m["world_size"] == 2 and m["steps"] == 6 and len(m["history"]) == 2
    assert m["config"]["async_update"] == (mode == "async")
    assert f"placement='{placement}'" in m["averager"]
    assert f"topology='{parallel}'" in m["averager"]
    assert_step_times_are_measured(m, log)
    assert sorted(p.name for p in ckpt.iterdir()) == ["step-000003", "step-000006"]
    assert checkpoints.committed(ckpt) == [ckpt / "step-000003", ckpt / "step-000006"]
    # Each rank wrote its own shards of the checkpoint.
    assert {p.name for p in (ckpt / "step-000006").glob("*.distcp")} == {
        "__0_0.distcp",
        "__1_0.distcp",
    }
    assert_average_file_is_the_checkpoint(out, ckpt / "step-000006")
    assert set(written(stdout)) == {
        *(out / f for f in ("metrics.json", "heldout.png", "average.pt")),
        ckpt / "step-000003",
        ckpt / "step-000006",
    }


# -- fault tolerance ------------------------------------------------------------------

FAULT_RUN = ["--parallel", "fsdp2", "--async", "--rule", "power", "--steps", "12",
             "--eval-every", "4"]  # fmt: skip


def test_a_killed_rank_restarts_resumes_and_ends_with_the_uninterrupted_average(
    tmp_path: Path,
) -> None:
    torchrun([*FAULT_RUN, "--out", str(tmp_path / "whole")], tmp_path)
    ckpt = tmp_path / "ckpt"
    _, log = torchrun(
        [*FAULT_RUN, "--out", str(tmp_path / "cut"), "--checkpoint-dir", str(ckpt),
         "--checkpoint-every", "4", "--fail-at-step", "10"],
        tmp_path,
        restarts=1,
    )  # fmt: skip

    assert "rank 1: dying before step 10 (--fail-at-step)" in log
    assert f"resumed from {ckpt / 'step-000008'} at step 8" in log
    whole, cut = metrics(tmp_path / "whole"), metrics(tmp_path / "cut")
    assert cut["steps"] == whole["steps"] == 12
    assert cut["average_sha256"] == whole["average_sha256"]
    # The model and the optimizer resumed exactly too: every evaluation is the same.
    assert cut["history"] == whole["history"]
    a, b = (
        torch.load(tmp_path / "whole" / "average.pt"),
        torch.load(tmp_path / "cut" / "average.pt"),
    )
    assert all(torch.equal(a[k], b[k]) for k in a)


# -- which checkpoint: order, commit marker, one choice for every rank ------------------


def _fake_checkpoint(path: Path, *, committed: bool = True, content: str = "") -> Path:
    path.mkdir(parents=True)
    (path / ".metadata").write_text(content)
    if committed:
        (path / checkpoints.MARKER).write_text("")
    return path


def test_checkpoints_are_ordered_by_step_number_and_rotation_keeps_the_newest(
    tmp_path: Path,
) -> None:
    for step in (998000, 999000, 1000000):  # "step-1000000" < "step-999000" as strings
        _fake_checkpoint(tmp_path / checkpoints.checkpoint_name(step))
    newest = tmp_path / "step-1000000"
    assert checkpoints.latest_checkpoint(tmp_path) == newest

    checkpoints.rotate(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-1000000", "step-999000"]
    assert checkpoints.latest_checkpoint(tmp_path) == newest


def test_a_directory_without_the_commit_marker_is_never_chosen(tmp_path: Path) -> None:
    _fake_checkpoint(tmp_path / "step-000008")
    # A kill mid-save: a directory in place without the marker, and a staging directory.
    _fake_checkpoint(tmp_path / "step-000012", committed=False)
    _fake_checkpoint(tmp_path / "step-000016.saving")
    assert checkpoints.latest_checkpoint(tmp_path) == tmp_path / "step-000008"

    checkpoints.rotate(tmp_path)  # what the saves cut short left goes at the next commit
    assert [p.name for p in tmp_path.iterdir()] == ["step-000008"]
    assert checkpoints.latest_checkpoint(tmp_path / "missing") is None


def _save_over_an_existing_checkpoint(rank: int, world: int, root: str) -> None:
    root_path = Path(root)
    final = root_path / "step-000008"

    def write(path: Path) -> None:
        # Mid-save, with the old checkpoint in place: resuming now takes the old one whole.
        assert checkpoints.latest_checkpoint(root_path) == final
        assert {p.name for p in final.iterdir()} == {".metadata", checkpoints.MARKER}
        assert (final / ".metadata").read_text() == "old"
        assert not (path / "__5_0.distcp").exists()  # a cut-short save's part was cleared
        path.mkdir(exist_ok=True)
        (path / f"__{rank}_0.distcp").write_text("new")
        if rank == 0:
            (path / ".metadata").write_text("new")

    assert checkpoints.save(root_path, 8, write) == final
    assert checkpoints.latest_checkpoint(root_path) == final
    assert [p.name for p in root_path.iterdir()] == ["step-000008"]
    names = {p.name for p in final.iterdir()}
    assert names == {".metadata", checkpoints.MARKER, "__0_0.distcp", "__1_0.distcp"}
    assert (final / ".metadata").read_text() == "new"


def test_saving_over_an_existing_checkpoint_replaces_it_whole(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    _fake_checkpoint(root / "step-000008", content="old")
    stale = root / "step-000008.saving"  # left by an attempt killed while saving step 8
    stale.mkdir()
    (stale / "__5_0.distcp").write_text("stale")
    run_distributed(_save_over_an_existing_checkpoint, 2, tmp_path / "ranks", str(root))


def _choose(rank: int, world: int, root: str, expect: str) -> None:
    mine = Path(root) / f"rank{rank}"  # node-local disks: each rank sees its own directory
    if expect.startswith("error"):
        with pytest.raises(RuntimeError) as e:
            checkpoints.choose_checkpoint(mine)
        assert expect.removeprefix("error: ") in str(e.value)
        return
    assert checkpoints.choose_checkpoint(mine) == mine / expect


def test_every_rank_resumes_from_rank_0s_choice(tmp_path: Path) -> None:
    for rank in range(2):
        _fake_checkpoint(tmp_path / f"rank{rank}" / "step-000008")
    _fake_checkpoint(tmp_path / "rank1" / "step-000012")  # only rank 1 sees it
    _fake_checkpoint(tmp_path / "rank0" / "step-000016", committed=False)  # rank 0: torn
    _fake_checkpoint(tmp_path / "rank1" / "step-000016")  # rank 1: committed
    run_distributed(_choose, 2, tmp_path / "ranks", str(tmp_path), "step-000008")


def test_a_rank_that_does_not_see_rank_0s_choice_fails_on_every_rank(tmp_path: Path) -> None:
    _fake_checkpoint(tmp_path / "rank0" / "step-000008")
    (tmp_path / "rank1").mkdir()
    run_distributed(
        _choose, 2, tmp_path / "ranks", str(tmp_path),
        "error: step-000008, which rank(s) [1] do not see: "
        "--checkpoint-dir must be one directory that every rank reads",
    )  # fmt: skip


# -- the clock --------------------------------------------------------------------------


class _Event:
    """A CUDA event whose clock advances one second per record()."""

    now = 0.0

    def __init__(self, enable_timing: bool = False) -> None:
        assert enable_timing

    def record(self) -> None:
        _Event.now += 1.0
        self.at = _Event.now

    def synchronize(self) -> None:
        pass

    def elapsed_time(self, end: _Event) -> float:
        return 1e3 * (end.at - self.at)  # milliseconds, as torch.cuda.Event's


def test_clock_on_cuda_times_with_device_events_read_later(monkeypatch) -> None:
    monkeypatch.setattr(torch, "get_device_module", lambda device: SimpleNamespace(Event=_Event))
    optimizer = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)
    clock = Clock(optimizer, torch.device("cuda"))
    clock.after_averager_built(optimizer)  # the fence would run between the two pre-hooks
    for _ in range(300):  # as the loop does: 4 seconds a step, 2 of them averaging
        t0 = clock.now()
        optimizer.step()  # the pre-hooks count the fence: one second
        t1, t2 = clock.now(), clock.now()
        clock.add("train", t0, t2)
        clock.add("average", t1, t2)
        clock.steps += 1
        assert len(clock._pending) <= 3 * Clock._PENDING  # read a while later, not all kept
    assert clock.per_step_ms() == (4000.0, 2000.0)


# -- accelerate and the multi-node script -----------------------------------------------


def test_accelerate_cpu_spelling_runs_two_connected_ranks_and_saves_every_shard(
    tmp_path: Path,
) -> None:
    pytest.importorskip("accelerate")
    env = _env()
    env["ACCELERATE_USE_CPU"] = "1"
    out, ckpt = tmp_path / "out", tmp_path / "ckpt"
    _, log = _run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
         "--num_processes", "2", "--main_process_port", "0", str(TRAIN_ACCELERATE), *SHORT,
         "--async", "--checkpoint-dir", str(ckpt), "--out", str(out)],
        tmp_path,
        env,
    )  # fmt: skip

    m = metrics(out)
    assert m["world_size"] == 2 and m["steps"] == 6
    # One job of 2 ranks to accelerate too: it wrapped the model in DDP.
    assert m["config"]["parallel"] == "multi_cpu"
    assert "topology='ddp'" in m["averager"]
    assert_step_times_are_measured(m, log)
    assert checkpoints.committed(ckpt) == [ckpt / "step-000003", ckpt / "step-000006"]
    state = ckpt / "step-000006"
    # save_state wrote every rank's shard of the average, beside accelerate's own files.
    assert {p.name for p in (state / "distavg").glob("*.distcp")} == {
        "__0_0.distcp",
        "__1_0.distcp",
    }
    assert (state / "custom_checkpoint_0.pkl").exists()
    assert_average_file_is_the_checkpoint(out, state / "distavg")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _script_env() -> dict[str, str]:
    # The scripts start "$PYTHON -m torch.distributed.run": no torchrun or python on PATH.
    return {**_env(), "PATH": "/usr/bin:/bin"}


def test_single_node_script_runs_the_job_with_the_python_it_is_given(tmp_path: Path) -> None:
    env = {**_script_env(), "NPROC_PER_NODE": "2"}
    out = tmp_path / "out"
    _run(["bash", str(SINGLE_NODE), "--steps", "2", "--out", str(out)], tmp_path, env)
    assert metrics(out)["world_size"] == 2


def test_multi_node_script_meets_at_the_c10d_rendezvous(tmp_path: Path) -> None:
    env = _script_env()
    env.update(NNODES="2", NPROC_PER_NODE="1", RDZV_ENDPOINT=f"localhost:{_free_port()}")
    args = ["--steps", "4", "--eval-every", "2"]
    nodes = [
        subprocess.Popen(
            ["bash", str(MULTI_NODE), *args, "--out", str(tmp_path / f"node{rank}")],
            cwd=tmp_path,
            env={**env, "NODE_RANK": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for rank in range(2)
    ]
    logs = [p.communicate(timeout=120)[0] for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], "\n".join(logs)[-6000:]
    found = list(tmp_path.glob("node*/metrics.json"))  # global rank 0's node
    assert len(found) == 1
    assert json.loads(found[0].read_text())["world_size"] == 2


# -- flags and --help -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--parallel", "fsdp1"], "argument --parallel: invalid choice: 'fsdp1'"),
        (["--placement", "everywhere"], "argument --placement: invalid choice"),
        (["--steps", "0"], "argument --steps: must be > 0, got 0"),
        (["--epochs", "two"], "argument --epochs: invalid int value: 'two'"),
        (["--label-noise", "1.5"], "argument --label-noise: must be in [0, 1), got 1.5"),
        (["--half-life", "5"], "--half-life does not apply to --rule annealing"),
        (["--rule", "swa", "--momentum", "0.1"], "--momentum does not apply to --rule swa"),
        (["--checkpoint-every", "5"], "--checkpoint-every and --resume need --checkpoint-dir"),
        (["--batch-size", "63"], "--batch-size 63 must be a multiple of the 2 ranks"),
    ],
)
def test_bad_flags_are_usage_errors(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str], monkeypatch
) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as e:
        config.parse_args(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: train.py")
    assert message in err


def test_a_flag_the_script_does_not_use_is_a_usage_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    unused = {"parallel": "the accelerate config picks it"}
    assert config.parse_args([], prog="train_accelerate.py", unused=unused).parallel is None
    with pytest.raises(SystemExit) as e:
        config.parse_args(["--parallel", "ddp"], prog="train_accelerate.py", unused=unused)
    assert e.value.code == 2
    assert "--parallel is not used by train_accelerate.py: the accelerate config picks it" in (
        capsys.readouterr().err
    )


def _help(argv: list[str], capsys: pytest.CaptureFixture[str]) -> dict[str, str]:
    """Each flag's help text, on one line."""
    with pytest.raises(SystemExit) as e:
        config.parse_args([*argv, "--help"])
    assert e.value.code == 0
    lines = capsys.readouterr().out.split("\noptions:\n", 1)[1].splitlines()
    entries = re.split(r"\n  (?=-)", "\n".join(x for x in lines if x.startswith("  ")))
    return {e.split()[0]: " ".join(e.split()) for e in entries if e.strip().startswith("--")}


def test_help_shows_each_flags_one_default_and_the_chosen_rules(
    capsys: pytest.CaptureFixture[str], monkeypatch
) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    flags = _help([], capsys)
    assert set(flags) == {f.flag for group in config.FLAGS.values() for f in group}
    for text in flags.values():
        assert "None" not in text, text
        assert text.count("default") <= 1, text
    for name, default in [("--lr", "0.1"), ("--epochs", "10"), ("--hidden", "128"),
                          ("--seed", "0"), ("--momentum", "0.02"), ("--gamma", "1")]:  # fmt: skip
        assert flags[name].endswith(f"default: {default})"), flags[name]
    assert flags["--half-life"].endswith("(rules: halflife; not used by --rule annealing)")

    flags = _help(["--rule", "warmup"], capsys)
    assert flags["--decay"].endswith("default: 0.9999)")  # WarmupEMA's own default
    assert flags["--momentum"].endswith("not used by --rule warmup)")
    flags = _help(["--rule", "halflife"], capsys)
    assert flags["--half-life"].endswith("default: 35)")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_device_cuda_without_gpus_is_a_usage_error(
    capsys: pytest.CaptureFixture[str], monkeypatch
) -> None:
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as e:
        config.parse_args(["--device", "cuda"])
    assert e.value.code == 2
    assert "--device cuda needs a GPU per process: 2 here, 0 GPUs" in capsys.readouterr().err


def test_a_fresh_run_into_a_used_checkpoint_dir_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _fake_checkpoint(tmp_path / "step-000040")
    _fake_checkpoint(tmp_path / "step-000050", committed=False)  # never chosen
    with pytest.raises(SystemExit) as e:
        config.parse_args(["--checkpoint-dir", str(tmp_path)])
    assert e.value.code == 2
    assert f"--checkpoint-dir {tmp_path} already holds step-000040: pass --resume" in (
        capsys.readouterr().err
    )
    assert config.parse_args(["--checkpoint-dir", str(tmp_path), "--resume"]).resume


def test_bad_flag_on_the_command_line_exits_with_usage(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, str(TRAIN), "--rule", "polyak"],
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 2
    assert r.stderr.startswith("usage: train.py")
    assert "argument --rule: invalid choice: 'polyak'" in r.stderr
