"""``tools/caffe``: a drop-in for Caffe's ``caffe`` tool (train, test, time, device_query).

Same gflags syntax as Caffe (``-solver x``, ``--solver=x``, flags anywhere), same glog-format log on
stderr.  ``-gpu`` picks CUDA; for ``train``, several ids (``-gpu 0,1``, or ``all`` with several devices)
start one training process per device, as Caffe's multi-GPU training (caffe-facts §13); ``test`` and
``time`` use the first.  Empty ``-gpu`` lets the solver's ``solver_mode`` decide, and ``-gpu -1`` (the
2015 default) means the CPU.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence

from lymph_cv.formats import gflags
from lymph_cv.errors import SIGNAL_EXIT_BASE, ConfigError
from lymph_cv.core.threads import configure_openmp

configure_openmp()  # the commands import torch lazily, after this

PROGRAM = "caffe"
SYNOPSIS = ("command line brew\nusage: caffe <command> <args>\n\ncommands:\n"
            "  train           train or finetune a model\n"
            "  test            score a model\n"
            "  device_query    show GPU diagnostic information\n"
            "  time            benchmark model execution time")
PHASES = ("TRAIN", "TEST")
F = gflags.Flag
FLAGS: Dict[str, gflags.Flag] = {
    "solver": F(str, "", "The solver definition protocol buffer text file."),
    "model": F(str, "", "The model definition protocol buffer text file."),
    "weights": F(str, "", "Optional; the pretrained weights to initialize finetuning, separated by ','. "
                          "Cannot be set simultaneously with snapshot."),
    "snapshot": F(str, "", "Optional; the snapshot solver state to resume training."),
    "iterations": F(int, 50, "The number of iterations to run."),
    "gpu": F(str, "", "Optional; run in GPU mode on given device IDs separated by ','. Use '-gpu all' to run "
                      "on all available GPUs. The effective training batch size is multiplied by the number "
                      "of devices."),
    "phase": F(str, "", "Optional; network phase (TRAIN or TEST). Only used for 'time'."),
    "level": F(int, 0, "Optional; network level."),
    "stage": F(str, "", "Optional; network stages (not to be confused with phase), separated by ','."),
    "sigint_effect": F(str, "stop", "Optional; action to take when a SIGINT signal is received: "
                                    "snapshot, stop or none."),
    "sighup_effect": F(str, "snapshot", "Optional; action to take when a SIGHUP signal is received: "
                                        "snapshot, stop or none."),
}


def _device(gpu: str) -> Optional[str]:
    """``-gpu`` → our device choice: None (solver decides), "cpu", "cuda" or "cuda:N"."""
    text = gpu.strip()
    if not text:
        return None
    if text == "all":
        return "cuda"
    ids = text.split(",")
    try:
        numbers = [int(i) for i in ids]
    except ValueError:
        raise ConfigError(f"-gpu {gpu!r}: expected device ids like 0 or 0,1, or 'all'") from None
    if numbers == [-1]:
        return "cpu"
    if any(n < 0 for n in numbers):
        raise ConfigError(f"-gpu {gpu!r}: device ids are >= 0")
    return f"cuda:{numbers[0]}" if numbers[0] != 0 else "cuda"


def _require(flags: dict, name: str, command: str) -> str:
    if not flags[name]:
        raise ConfigError(f"need -{name} for caffe {command}")
    return flags[name]


def _weights(flags: dict) -> List[str]:
    return [w for w in flags["weights"].split(",") if w]


def _phase(flags: dict, default: str) -> int:
    from lymph_cv.formats.caffe import caffe_pb2

    name = (flags["phase"] or default).upper()
    if name not in PHASES:
        raise ConfigError(f"-phase {flags['phase']!r}", valid=PHASES)
    return caffe_pb2.TRAIN if name == "TRAIN" else caffe_pb2.TEST


def cmd_train(flags: dict) -> int:
    from lymph_cv.stages.train import train

    solver = _require(flags, "solver", "train")
    if flags["snapshot"] and flags["weights"]:
        raise ConfigError("give -snapshot or -weights, but not both")
    device = _device(flags["gpu"])
    if device is not None and device.startswith("cuda") and flags["gpu"].strip():
        from lymph_cv.core.distributed import discover, parse_gpus

        ids = parse_gpus(flags["gpu"])
        world = discover()
        if not world.distributed and len(ids) > 1:
            from lymph_cv.cluster.launch import launch_local, lymph_cv_command

            argv = [f"-{name}={value}" for name, value in flags.items() if value not in ("", None)]
            return launch_local(lymph_cv_command(["train", *argv], __name__), len(ids))
        if world.local_rank >= len(ids):
            raise ConfigError(f"-gpu {flags['gpu']!r}: rank {world.local_rank} has no device")
        device = f"cuda:{ids[world.local_rank]}"
    result = train(solver, snapshot=flags["snapshot"] or None, weights=_weights(flags), device=device,
                   sigint_effect=flags["sigint_effect"], sighup_effect=flags["sighup_effect"])
    if result.stopped_early and result.stop_signal is not None:
        # Caffe exits 0 here; a stopped run is not a finished one (job states, `&&` chains).
        return SIGNAL_EXIT_BASE + result.stop_signal
    return 0


def cmd_test(flags: dict) -> int:
    from lymph_cv.formats import caffelog
    from lymph_cv.stages.train import test_model

    model = _require(flags, "model", "test")
    weights = _weights(flags)
    if not weights:
        raise ConfigError("need model weights to score (-weights)")
    with caffelog.caffe_log() as log:
        test_model(model, weights, flags["iterations"], device=_device(flags["gpu"]) or "cpu", log=log)
    return 0


def cmd_time(flags: dict) -> int:
    from lymph_cv.formats import caffelog
    from lymph_cv.stages.timing import time_model

    model = _require(flags, "model", "time")
    with caffelog.caffe_log() as log:
        time_model(model, flags["iterations"], phase=_phase(flags, "TRAIN"),
                   device=_device(flags["gpu"]) or "cpu", log=log)
    return 0


def cmd_device_query(flags: dict) -> int:
    import torch

    from lymph_cv.formats import caffelog

    if not torch.cuda.is_available():
        raise ConfigError("no CUDA device is available")
    with caffelog.caffe_log() as log:
        ids = range(torch.cuda.device_count()) if flags["gpu"] in ("", "all") else \
            [int(i) for i in flags["gpu"].split(",")]
        for i in ids:
            props = torch.cuda.get_device_properties(i)
            log.info(f"Querying GPU {i}")
            log.info(f"Device id:                     {i}")
            log.info(f"Major revision number:         {props.major}")
            log.info(f"Minor revision number:         {props.minor}")
            log.info(f"Name:                          {props.name}")
            log.info(f"Total global memory:           {props.total_memory}")
            log.info(f"Number of multiprocessors:     {props.multi_processor_count}")
    return 0


COMMANDS: Dict[str, Callable[[dict], int]] = {
    "train": cmd_train, "test": cmd_test, "time": cmd_time, "device_query": cmd_device_query}


def run(flags: dict, positional: List[str]) -> int:
    """Dispatch ``caffe <command>`` to its function."""
    if len(positional) != 1 or positional[0] not in COMMANDS:
        given = " ".join(positional) or "(none)"
        raise ConfigError(f"unknown action {given}; available caffe actions: {', '.join(COMMANDS)}")
    return COMMANDS[positional[0]](flags)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``caffe <command> [flags]``; returns the exit status (2 with one error line on failure)."""
    return gflags.run_tool(run, argv, PROGRAM, SYNOPSIS, FLAGS)


if __name__ == "__main__":  # the ranks of `caffe train -gpu 0,1` start here
    import sys

    sys.exit(main(sys.argv[1:]))
