"""torchrun + DDP on the CPU (gloo): two processes train, agree on the weights, match one process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fastcifar.cli import app
from narrow_custresnet import OUT_OF_MEMORY_AT, STEP_SECONDS


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# The ranks run `fastcifar` through this file: the suite's narrow CustResNet, as in this process.
NARROW_FASTCIFAR = str(Path(__file__).with_name("narrow_custresnet.py"))

# The fast recipe (plain SGD): the tolerances below were set for it. LR 0.1: after 2 epochs on
# the tiny set the narrow net scored 1.0 with 3 of seeds 0-3 at 0.1, with 1 of them at 0.05.
# The CPU: on a machine with GPUs these ranks would each take one (or lack one).
TRAIN_ARGS = ["--recipe", "fast", "--epochs", "2", "--max-lr", "0.1", "--precision", "fp32",
              "--workers", "1", "--cutout", "4", "--no-tta", "--eval-from-epoch", "1",
              "--device", "cpu"]


@pytest.mark.slow
def test_torchrun_two_processes_train_and_agree(tiny_dataset, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
               "--master_addr=127.0.0.1", f"--master_port={_free_port()}", NARROW_FASTCIFAR,
               "train", *TRAIN_ARGS, "--batch-size", "12", "--eval-every-steps", "2",
               "--data", str(tiny_dataset),
               "--out", str(tmp_path / "ddp"), "--weights", str(tmp_path / "ddp-weights")]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    # only rank 0 prints the table and writes files
    assert finished.stdout.count("final test accuracy") == 1
    (run_dir,) = (tmp_path / "ddp").iterdir()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["ranks_agree"] is True
    # 5 steps of a global batch of 24 per epoch: 120 images, each rank reading half
    assert metrics["epochs"][-1]["steps"] == 10
    # in-epoch passes in the last epoch: every rank evaluates, rank 0 alone keeps the best
    assert [row["epochs"] for row in metrics["evaluations"]] == pytest.approx([1, 1.4, 1.8, 2])
    assert len(list((tmp_path / "ddp-weights").glob("*-best.safetensors"))) == 1
    assert len(list((tmp_path / "ddp-weights").glob("*-final.safetensors"))) == 1

    # The one-process run in this process: the same command without a second interpreter's
    # start-up (~10 s of imports where the CPU is slow).
    single = CliRunner().invoke(app, ["train", *TRAIN_ARGS, "--batch-size", "24",
                                      "--data", str(tiny_dataset), "--out", str(tmp_path / "single"),
                                      "--weights", str(tmp_path / "single-weights")])
    assert single.exit_code == 0, (single.output[-3000:], single.exception)
    (single_dir,) = (tmp_path / "single").iterdir()
    single_metrics = json.loads((single_dir / "metrics.json").read_text())
    # Same global batch and schedule; per-rank BN statistics and shard order differ, so the
    # tolerance is on outcomes: both learn the easy task, final train losses within 25%.
    ddp_last, single_last = metrics["epochs"][-1], single_metrics["epochs"][-1]
    assert ddp_last["test_accuracy"] >= 0.8 and single_last["test_accuracy"] >= 0.8
    assert abs(ddp_last["train_loss"] - single_last["train_loss"]) <= 0.25 * single_last["train_loss"]


def _torchrun(tiny_dataset, tmp_path, name: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
            "--master_addr=127.0.0.1", f"--master_port={_free_port()}", NARROW_FASTCIFAR,
            "train", "--recipe", "fast", "--epochs", "2", "--max-lr", "0.05", "--precision",
            "fp32", "--workers", "1", "--cutout", "4", "--no-tta", "--batch-size", "6", "--data",
            str(tiny_dataset),
            "--out", str(tmp_path / name), "--weights", str(tmp_path / f"{name}-weights"),
            *extra]


@pytest.mark.slow
def test_sigterm_to_torchrun_stops_every_rank_with_one_checkpoint_that_resumes(tiny_dataset,
                                                                              tmp_path):
    import signal
    import time

    from fastcifar.checkpoint import load_checkpoint

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # The signal must land in the 6 steps between epoch 1's end and the ranks' comparison at
    # step 16: each step held 0.4 s gives it over 2 s (narrow steps alone, a few tenths).
    launcher = subprocess.Popen(_torchrun(tiny_dataset, tmp_path, "stopped"),
                                env={**env, STEP_SECONDS: "0.4"},
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 240
    while not list((tmp_path / "stopped").glob("*/last.pt")):  # epoch 1 is done (step 10)
        assert launcher.poll() is None and time.monotonic() < deadline, launcher.stdout.read()
        time.sleep(0.2)
    launcher.send_signal(signal.SIGTERM)
    output, _ = launcher.communicate(timeout=120)
    # Each rank stops at the agreed step, saves and exits 143 (128 + SIGTERM) with the
    # one-line message; torchrun itself re-raises the signal as its SignalException: exit 1.
    assert "interrupted; checkpoint saved" in output, output
    assert launcher.returncode == 1 and "got signal: 15" in output, output
    (checkpoint,) = (tmp_path / "stopped").glob("*/last.pt")  # one run, one checkpoint
    state = load_checkpoint(checkpoint)
    # 10 steps an epoch; ranks compare their stop flags every 16 steps: both stop at step 16
    assert state["epoch"] == 1 and state["partial"]["step"] == 6 and state["steps"] == 16, output
    assert state["partial"]["train_seconds"] >= 6 * 0.4  # the ranks' steps were paced
    assert state["world_size"] == 2  # a resume with another process count is refused
    resumed = subprocess.run(_torchrun(tiny_dataset, tmp_path, "stopped", "--resume",
                                       str(checkpoint)),
                             capture_output=True, text=True, timeout=300, env=env)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    whole = subprocess.run(_torchrun(tiny_dataset, tmp_path, "whole"), capture_output=True,
                           text=True, timeout=300, env=env)
    assert whole.returncode == 0, whole.stdout[-3000:]
    (whole_dir,) = (tmp_path / "whole").iterdir()
    expected = json.loads((whole_dir / "metrics.json").read_text())["epochs"]
    got = json.loads((checkpoint.parent / "metrics.json").read_text())["epochs"]
    assert [row["test_accuracy"] for row in got] == [row["test_accuracy"] for row in expected]
    assert [row["train_loss"] for row in got] == pytest.approx(
        [row["train_loss"] for row in expected], rel=1e-6)


@pytest.mark.slow
def test_a_fault_on_a_rank_that_writes_nothing_names_the_checkpoint_rank_0_wrote(tiny_dataset,
                                                                                 tmp_path):
    # Only rank 0 writes last.pt, yet every rank's fault line must point to it: here rank 1
    # runs out of memory in epoch 2 (10 steps an epoch), after epoch 1's checkpoint.
    env = {**os.environ, "OMP_NUM_THREADS": "1", OUT_OF_MEMORY_AT: "1:12"}
    failed = subprocess.run(_torchrun(tiny_dataset, tmp_path, "oom"), capture_output=True,
                            text=True, timeout=300, env=env)
    assert failed.returncode != 0, failed.stdout[-3000:] + failed.stderr[-3000:]
    (checkpoint,) = (tmp_path / "oom").glob("*/last.pt")
    assert (f"error: out of memory on cpu at --batch-size 6: start a new run with --batch-size 3,"
            f" or free memory; the last intact checkpoint is {checkpoint} (saved after epoch 1): "
            f"continue with the same options plus `--resume {checkpoint}`"
            in failed.stderr.splitlines()), failed.stderr[-3000:]  # one line (soft wrap)


def test_a_signal_another_rank_got_after_the_last_comparison_stops_this_one_too(
        tiny_dataset, tmp_path, monkeypatch):
    import signal

    import fastcifar.training
    from fastcifar.checkpoint import load_checkpoint

    def other_rank_signalled_late(stop, steps, distributed, device, every: int) -> bool:
        # Inside the epoch (the ranks compare every 16 steps) no rank had a signal; at the
        # epoch's end the comparison brings another rank's SIGTERM, as stop_agreed does.
        if every == 1:
            stop.signal_number = signal.SIGTERM
            return True
        return False

    monkeypatch.setattr(fastcifar.training, "stop_agreed", other_rank_signalled_late)
    result = CliRunner().invoke(app, ["train", *TRAIN_ARGS, "--batch-size", "24",
                                      "--data", str(tiny_dataset), "--out", str(tmp_path / "r"),
                                      "--weights", str(tmp_path / "w")])
    assert result.exit_code == 143, (result.output, result.exception)  # 128 + SIGTERM
    (checkpoint,) = (tmp_path / "r").glob("*/last.pt")
    state = load_checkpoint(checkpoint)
    assert state["epoch"] == 0 and state["partial"]["step"] == 5  # all of epoch 1, no more


def _rank_checks_a_loss_only_rank_1_saw_go_non_finite(rank: int, port: int, out_dir: str
                                                       ) -> None:
    """One of two gloo ranks (spawned): only rank 1's train and proxy losses are NaN; writes
    what this rank's checks answered."""
    import torch

    from fastcifar.config import recipe
    from fastcifar.distributed import Distributed, end_process_group, start_process_group
    from fastcifar.epoch_state import TrainSums
    from fastcifar.errors import FastCifarError
    from fastcifar.selection import DIVERGENCE_CHECK_CALLS, BatchSelection

    start_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                        world_size=2)
    try:
        distributed, cpu = Distributed(rank=rank, world_size=2), torch.device("cpu")
        loss = torch.tensor(float("nan") if rank == 1 else 1.0)
        sums = TrainSums(cpu)
        sums.add(loss, torch.eye(2), torch.tensor([0, 1]))
        answers = {"train_finite": sums.finite(distributed)}
        selection = BatchSelection(recipe("express-progressive", epochs=4, select_fraction=0.5,
                                          whiten=False), cpu, 10, 5, distributed=distributed)
        selection.calls = DIVERGENCE_CHECK_CALLS - 1  # the next call checks
        try:
            selection._check_finite(loss)
            answers["proxy_stopped"] = False
        except FastCifarError:
            answers["proxy_stopped"] = True
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(answers))
    finally:
        end_process_group()


def test_a_loss_that_went_non_finite_on_one_rank_stops_every_rank_at_the_same_check(
        tmp_path):
    # A rank that stopped alone left the others waiting at their next collective until
    # torchrun tore the job down; each check is now one all-reduce, so all ranks answer alike.
    import torch.multiprocessing

    torch.multiprocessing.spawn(_rank_checks_a_loss_only_rank_1_saw_go_non_finite,
                                args=(_free_port(), str(tmp_path)), nprocs=2)
    answers = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert answers == [{"train_finite": False, "proxy_stopped": True}] * 2


def _rank_runs_a_write_only_rank_0_makes(rank: int, port: int, out_dir: str, fails: bool
                                         ) -> None:
    """One of two gloo ranks (spawned): rank 0's write fails (a full disk) when `fails`; writes
    who called the write and what each rank's check raised."""

    from fastcifar.distributed import (
        Distributed,
        end_process_group,
        main_writes_agreed,
        start_process_group,
    )
    from fastcifar.errors import MachineFault, WriteFailed

    start_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                        world_size=2)
    calls = []

    def write() -> None:
        calls.append(rank)
        if fails:
            raise WriteFailed(Path(out_dir, "last.pt"), "No space left on device")

    try:
        main_writes_agreed(write, Distributed(rank=rank, world_size=2))
        raised = None
    except MachineFault as error:
        raised = [type(error).__name__, str(error)]
    finally:
        end_process_group()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"calls": calls, "raised": raised}))


@pytest.mark.parametrize("fails", [True, False])
def test_a_write_that_fails_on_rank_0_stops_every_rank_with_its_reason(tmp_path, fails):
    # Before, rank 0 ended alone and the others waited at their next collective until
    # torchrun tore the job down.
    import torch.multiprocessing

    torch.multiprocessing.spawn(_rank_runs_a_write_only_rank_0_makes,
                                args=(_free_port(), str(tmp_path), fails), nprocs=2)
    answers = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [answer["calls"] for answer in answers] == [[0], []]  # rank 0 alone writes
    if not fails:
        assert [answer["raised"] for answer in answers] == [None, None]
        return
    reason = f"could not write {tmp_path / 'last.pt'}: No space left on device"
    assert answers[0]["raised"] == ["WriteFailed", reason]
    assert answers[1]["raised"] == ["MachineFault", f"rank 0 stopped: {reason}"]


def _rank_whose_peer_ends_before_a_collective(rank: int, port: int, out_dir: str) -> None:
    """One of two gloo ranks (spawned): rank 1 ends at once after the group is up, as a rank
    that failed does; rank 0's next collective runs inside a run's fault handling, writes the
    error that left it and exits as the command does (the group ended at exit)."""
    import os
    from datetime import timedelta

    import torch

    from fastcifar.distributed import Distributed, start_process_group
    from fastcifar.run_faults import RunFaults

    start_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                        world_size=2, timeout=timedelta(seconds=60))
    import torch.distributed as dist

    dist.barrier()  # both ranks' connections are up
    if rank == 1:
        os._exit(0)  # no goodbye to rank 0, as a rank the kernel killed
    faults = RunFaults(Path(out_dir, "last.pt"), 3, 512, torch.device("cpu"),
                       Distributed(rank, 2))
    try:
        with faults.end_in_one_line():
            dist.all_reduce(torch.ones(1))
        raised = None
    except Exception as error:  # what reached the command's one-line exit, or not
        raised = [type(error).__name__, str(error)]
    Path(out_dir, "rank0.json").write_text(json.dumps(raised))


def test_a_rank_whose_peer_ended_stops_with_one_line_not_a_traceback(tmp_path):
    # A rank that ran out of memory exits with its line; the others' collective then fails
    # with gloo's "Connection closed by peer", which each printed as a screen-long traceback.
    import time

    import torch.multiprocessing

    ranks = torch.multiprocessing.start_processes(
        _rank_whose_peer_ends_before_a_collective, args=(_free_port(), str(tmp_path)),
        nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + 120
    try:
        while not ranks.join(timeout=5):  # rank 0 exits, its group ended, with its peer gone
            assert time.monotonic() < deadline, "a rank did not exit"
    finally:  # a rank that hung is not left running after the test
        for process in ranks.processes:
            process.kill()
    kind, message = json.loads((tmp_path / "rank0.json").read_text())
    assert kind == "MachineFault", message
    assert message.startswith("rank 0 stopped because another rank of the job ended (gloo: "
                              "connection "), message
    assert message.endswith(f"the last intact checkpoint is {tmp_path / 'last.pt'} (saved after"
                            f" epoch 3): continue with the same options plus "
                            f"`--resume {tmp_path / 'last.pt'}`"), message


GLOO_CLOSED = ("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:561] "
               "Connection closed by peer [127.0.0.1]:51891. This is typically caused by a "
               "remote worker crashing.")
GLOO_RESET = ("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:545] Read "
              "error [127.0.0.1]:55186: Connection reset by peer. This is typically caused by "
              "a remote worker hanging or bugs in the application.")
NCCL_REMOTE = ("NCCL error in: ProcessGroupNCCL.cpp:2049, remote process exited or there was a "
               "network error, NCCL version 2.27.3\nncclRemoteError: A call failed possibly "
               "due to a network error or a remote process exiting prematurely.")


@pytest.mark.parametrize(("make_error", "world_size", "cause"), [
    (lambda: RuntimeError(GLOO_CLOSED), 2, "gloo: connection closed by peer"),
    (lambda: RuntimeError(GLOO_RESET), 2, "gloo: connection reset by peer"),
    (lambda: _dist_error("DistBackendError", NCCL_REMOTE), 2,
     "NCCL: remote process exiting prematurely"),
    (lambda: RuntimeError(GLOO_CLOSED), 1, None),  # one process: no other rank to blame
    (lambda: _dist_error("DistBackendError", "NCCL error in: x, invalid usage"), 2, None),
    (lambda: _dist_error("DistStoreError", "wait timeout after 30000ms"), 2, None),
    (lambda: RuntimeError("DataLoader worker: BrokenPipeError: [Errno 32] Broken pipe"), 2,
     None),
    (lambda: ValueError(GLOO_CLOSED), 2, None),
])
def test_only_a_collective_that_lost_another_rank_is_named_so(make_error, world_size, cause):
    from fastcifar.distributed import Distributed, lost_rank_cause

    assert lost_rank_cause(make_error(), Distributed(0, world_size)) == cause


def _dist_error(kind: str, text: str) -> RuntimeError:
    import torch.distributed

    return getattr(torch.distributed, kind)(text)


def test_an_error_that_is_not_a_lost_rank_keeps_its_traceback():
    # A bug stays a traceback to report, under torchrun too.
    import torch

    from fastcifar.distributed import Distributed
    from fastcifar.run_faults import RunFaults

    faults = RunFaults(None, 0, 512, torch.device("cpu"), Distributed(0, 2))
    with pytest.raises(RuntimeError, match="some other bug"):
        with faults.end_in_one_line():
            raise RuntimeError("some other bug")


def _rank_reaches_its_exit_after_a_collective(rank: int, port: int, out_dir: str) -> None:
    """One of two gloo ranks (spawned): steps a DDP model (its first optimiser imports torch's
    compiler) and drops it, as a run ends, then runs the exit handlers; writes the names of
    gloo's threads left after them."""
    import atexit
    import gc

    import torch

    from fastcifar.distributed import start_process_group

    # A run's DDP wrapper is old by its end, so no automatic collection need have reached it.
    gc.disable()
    start_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(2, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.ones(3, 2)).sum().backward()  # DDP all-reduces the gradients
    optimizer.step()
    del model, optimizer  # DDP's reference cycles hold the group until a collection
    atexit._run_exitfuncs()  # what the interpreter runs before it finalizes
    names = []
    for task in Path("/proc/self/task").iterdir():
        try:
            names.append((task / "comm").read_text().strip())
        except OSError:  # a thread that ended meanwhile
            continue
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(
        [name for name in names if "gloo" in name]))


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads Linux's /proc")
def test_a_rank_ends_its_group_and_gloos_threads_before_the_interpreter_finalizes(tmp_path):
    # A worker thread still holding a collective's tensor at finalization needs the GIL to let
    # it go and aborted the rank (SIGABRT after a finished run: 7 of 47 jobs before the fix).
    import torch.multiprocessing

    torch.multiprocessing.spawn(_rank_reaches_its_exit_after_a_collective,
                                args=(_free_port(), str(tmp_path)), nprocs=2)
    threads_left = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert threads_left == [[], []]


def test_a_runs_start_epoch_ends_and_end_write_through_the_agreed_check(tiny_dataset, tmp_path,
                                                                       monkeypatch):
    import fastcifar.training
    from fastcifar.distributed import main_writes_agreed

    written = []

    def files() -> set[tuple[str, int, int]]:  # TensorBoard's writer thread keeps its own time
        return {(path.name, path.stat().st_ino, path.stat().st_mtime_ns)
                for path in tmp_path.rglob("*")
                if path.is_file() and not path.name.startswith("events.out.tfevents")}

    def recording(write, distributed) -> None:
        before = files()
        main_writes_agreed(write, distributed)
        written.append(sorted(name for name, _, _ in files() - before))

    monkeypatch.setattr(fastcifar.training, "main_writes_agreed", recording)
    result = CliRunner().invoke(app, ["train", *TRAIN_ARGS, "--batch-size", "24",
                                      "--data", str(tiny_dataset), "--out", str(tmp_path / "r"),
                                      "--weights", str(tmp_path / "w")])
    assert result.exit_code == 0, (result.output, result.exception)
    assert written[0] == ["run.json"]
    assert written[1:3] == [["last.pt", "metrics.csv", "metrics.json"]] * 2  # epochs 1 and 2
    # and at the end: the metrics once more and the final weights
    (final,) = (path.name for path in (tmp_path / "w").glob("*-final.safetensors"))
    assert written[3:] == [sorted([final, "metrics.csv", "metrics.json"])]


def test_a_cuda_rank_makes_its_gpu_current_before_the_group_and_mps_is_refused(monkeypatch):
    # NCCL's object broadcasts run on the current device: every rank's was cuda:0.
    import dataclasses

    import torch

    import fastcifar.distributed as distributed
    from fastcifar.config import recipe
    from fastcifar.errors import FastCifarError

    config = recipe("fast")
    config = dataclasses.replace(config, loader=dataclasses.replace(config.loader,
                                                                    distributed=True))
    calls = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(("set", device)))
    monkeypatch.setattr(distributed, "start_process_group",
                        lambda backend: calls.append(("group", backend)))
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 1)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    assert distributed.init_distributed(config, torch.device("cuda", 1)).rank == 1
    assert calls == [("set", torch.device("cuda", 1)), ("group", "nccl")]
    with pytest.raises(FastCifarError, match="torchrun on Apple's MPS is not supported"):
        distributed.init_distributed(config, torch.device("mps"))
