"""MIL throughput on the CPU: instances/s of training (gradients through --grad-instances of each bag,
the rest forwarded without) and of inference, for a ResNet-18 instance encoder at 112x112 (the seed's
centre crop) with the attention head by default.

Prints instances/s per wall second and per CPU second of this process (on a shared machine the second
is the steadier figure), and the encoder's plain forward / forward+backward rates for comparison.

    .venv/bin/python benchmarks/bench_mil.py [--arch resnet18] [--crop 112] [--bags 4] [--instances 32]
                                             [--grad-instances 8] [--steps 3] [--threads N]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from lymph_cv.stages.mil.data import BagData
from lymph_cv.stages.mil.evaluate import predict_bags
from lymph_cv.stages.mil.train import MILConfig, MILTrained, build_model, train_mil

CLASSES = ["reactive", "tumoral"]


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--method", default="attention")
    parser.add_argument("--crop", type=int, default=112)
    parser.add_argument("--bags", type=int, default=4, help="bags per batch (and bags trained per epoch)")
    parser.add_argument("--instances", type=int, default=32, help="instances per bag")
    parser.add_argument("--grad-instances", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3, help="training batches timed (one epoch of --bags x steps)")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    bags = [BagData(f"b{i}", i % 2, rng.integers(0, 256, (args.instances, args.crop, args.crop, 3), dtype=np.uint8),
                    [f"i{j}" for j in range(args.instances)]) for i in range(args.bags * args.steps)]
    config = MILConfig(method=args.method, arch=args.arch, crop=args.crop, epochs=1, bags_per_batch=args.bags,
                       grad_instances=args.grad_instances, mirror=False)
    print(f"{args.arch} {args.crop}x{args.crop}, {args.method}, {args.bags} bags x {args.instances} instances a batch, "
          f"{args.grad_instances} with gradients, torch threads {torch.get_num_threads()}")
    train_mil(bags[:args.bags], CLASSES, config)  # warm-up (allocator, first-call paths)
    result = {}
    wall, cpu = timed(lambda: result.setdefault("trained", train_mil(bags, CLASSES, config)))
    n = len(bags) * args.instances
    print(f"training:  {n / wall:8.1f} instances/s wall, {n / cpu:8.1f} per CPU second "
          f"({len(bags) * args.grad_instances} of {n} with gradients)")
    trained: MILTrained = result["trained"]
    predict_bags(trained, bags[:1])
    wall, cpu = timed(lambda: predict_bags(trained, bags))
    print(f"inference: {n / wall:8.1f} instances/s wall, {n / cpu:8.1f} per CPU second")
    model, _ = build_model(config, len(CLASSES), None)
    x = torch.randn(args.bags * args.grad_instances, 3, args.crop, args.crop)

    def forward_backward():
        model.features(x).sum().backward()

    forward_backward()
    wall, cpu = timed(forward_backward)
    print(f"encoder forward+backward alone: {len(x) / wall:8.1f} instances/s wall, {len(x) / cpu:8.1f} per CPU second")


if __name__ == "__main__":
    main()
