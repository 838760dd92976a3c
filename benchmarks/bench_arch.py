"""ms per iteration of the residual nets: our engine (the rendered Caffe prototxt) vs plain PyTorch.

For ResNet-18 (96x96, batch 64) and ResNet-50 (96x96, batch 32 by default) on the CPU, prints the
median ms of forward, forward+backward and the SGD update (momentum 0.9, weight decay), for the
CaffeNet built from ``render --arch`` and for a plain PyTorch model of the same network written
below (nn.Conv2d, nn.BatchNorm2d, ...) holding the same weights, both channels-last, plus the
ratio ours / plain (the aim: <= 1.15).  TEST-phase forward too (ours fuses conv + BatchNorm +
Scale where exact).  ``--device cuda`` times on a GPU; ``--amp bf16|fp16`` (CUDA only) runs both
under torch.autocast.

    .venv/bin/python benchmarks/bench_arch.py [--arch resnet18 resnet50] [--repeat 5] [--device cpu]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from lymph_cv.formats.caffe import caffe_pb2
from lymph_cv.formats.caffe.prototxt import read_net_prototxt
from lymph_cv.net.build import build_net
from lymph_cv.net.solver import learnables_of, make_solver
from lymph_cv.stages.render import render_fold

CLASSES = 2
SIZE = 96
BATCHES = {"resnet18": 64, "resnet34": 64, "resnet50": 32}
DEPTHS = {"resnet18": ((2, 2, 2, 2), False), "resnet34": ((3, 4, 6, 3), False), "resnet50": ((3, 4, 6, 3), True)}
AMP = {"bf16": torch.bfloat16, "fp16": torch.float16}


# ------------------------------------------------------------------ the plain PyTorch model


class ConvBN(nn.Sequential):
    def __init__(self, cin, cout, kernel, stride, relu):
        layers = [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(cout, eps=1e-5)]
        if relu:
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


class Block(nn.Module):
    def __init__(self, cin, width, stride, bottleneck):
        super().__init__()
        cout = width * 4 if bottleneck else width
        if bottleneck:
            self.branch = nn.Sequential(ConvBN(cin, width, 1, 1, True), ConvBN(width, width, 3, stride, True),
                                        ConvBN(width, cout, 1, 1, False))
        else:
            self.branch = nn.Sequential(ConvBN(cin, width, 3, stride, True), ConvBN(width, width, 3, 1, False))
        self.shortcut = ConvBN(cin, cout, 1, stride, False) if stride != 1 or cin != cout else None
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        skip = x if self.shortcut is None else self.shortcut(x)
        return self.relu(self.branch(x) + skip)


class PlainResNet(nn.Module):
    """The same net as the rendered prototxt (ImageNet stem: 7x7/2, 3x3/2 max-pool with ceil)."""

    def __init__(self, depths, bottleneck, classes):
        super().__init__()
        self.stem = nn.Sequential(ConvBN(3, 64, 7, 2, True), nn.MaxPool2d(3, 2, ceil_mode=True))
        blocks, cin = [], 64
        for stage, (width, count) in enumerate(zip((64, 128, 256, 512), depths)):
            for index in range(count):
                blocks.append(Block(cin, width, 2 if stage and not index else 1, bottleneck))
                cin = width * 4 if bottleneck else width
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1), 1))


def copy_weights(ours, plain: PlainResNet) -> None:
    """Our blobs → the plain model's: each Convolution's weight, its Scale's γ/β into the BN affine, fc."""
    by_name = {layer.name: layer for layer in ours.layers}
    names = [layer.name for layer in ours.layers if layer.type_name == "Convolution"]
    plain_convs = _plain_order(plain)
    if len(plain_convs) != len(names):
        raise SystemExit(f"{len(plain_convs)} plain convolutions vs {len(names)} rendered")
    scales = {layer.param.bottom[0]: layer for layer in ours.layers if layer.type_name == "Scale"}
    with torch.no_grad():
        for name, module in zip(names, plain_convs):
            conv, bn = module[0], module[1]
            conv.weight.copy_(by_name[name].blobs[0])
            bn.weight.copy_(scales[name].blobs[0])
            bn.bias.copy_(scales[name].blobs[1])
        plain.fc.weight.copy_(by_name["fc"].blobs[0])
        plain.fc.bias.copy_(by_name["fc"].blobs[1])


def _plain_order(plain: PlainResNet):
    """ConvBN modules in the rendered prototxt's order: stem, then per block shortcut first."""
    order = [plain.stem[0]]
    for block in plain.blocks:
        if block.shortcut is not None:
            order.append(block.shortcut)
        order.extend(block.branch)
    return order


# ------------------------------------------------------------------ timing


def median_ms(fn, repeat: int, sync) -> float:
    fn()
    sync()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def bench(arch: str, batch: int, repeat: int, device: torch.device, amp, rounds: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for kind in ("train", "test"):
            (work / f"{kind}_w32_1.txt").write_text("".join(f"p{i}\t{i % CLASSES}\n" for i in range(batch)))
        (work / "manifest.json").write_text(json.dumps({"patch_size": SIZE}))
        fold = render_fold(work, 1, arch=arch, overrides={"batch_size": str(batch), "crop_size": str(SIZE)})
        net_param = read_net_prototxt(fold.net)
        deploy_param = read_net_prototxt(fold.deploy)
    shapes = {"data": (batch, 3, SIZE, SIZE), "label": (batch,)}
    ours = build_net(net_param, caffe_pb2.TRAIN, input_shapes=shapes)
    ours.init_params(torch.Generator().manual_seed(0))
    test = build_net(deploy_param, caffe_pb2.TEST, input_shapes={"data": shapes["data"]})
    depths, bottleneck = DEPTHS[arch]
    plain = PlainResNet(depths, bottleneck, CLASSES)
    copy_weights(ours, plain)
    ours.to(device)
    plain.to(device).to(memory_format=torch.channels_last)
    x = torch.randn(shapes["data"], device=device).contiguous(memory_format=torch.channels_last)
    y = (torch.arange(batch, device=device) % CLASSES).float()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    autocast = (lambda: torch.autocast("cuda", dtype=AMP[amp])) if amp else contextlib.nullcontext
    solver = make_solver(caffe_pb2.SolverParameter(base_lr=0.01, lr_policy="fixed", momentum=0.9,
                                                   weight_decay=1e-4, type="SGD"), learnables_of(ours))
    optim = torch.optim.SGD(plain.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    loss_fn = nn.CrossEntropyLoss()

    def ours_fwd():
        with torch.no_grad(), autocast():
            ours.forward({"data": x, "label": y})

    def ours_fwd_bwd():
        with autocast():
            loss = ours.loss(ours.forward({"data": x, "label": y}))
        loss.backward()

    def ours_update():
        solver.apply_update()
        solver.zero_grad()

    def plain_fwd():
        with torch.no_grad(), autocast():
            plain(x)

    def plain_fwd_bwd():
        with autocast():
            loss = loss_fn(plain(x).float(), y.long())
        loss.backward()

    def plain_update():
        optim.step()
        optim.zero_grad(set_to_none=False)

    test.share_weights_from(ours)
    test.to(device)
    plain_eval = PlainResNet(depths, bottleneck, CLASSES).to(device).to(memory_format=torch.channels_last)
    plain_eval.load_state_dict(plain.state_dict())
    plain_eval.eval()

    def ours_test():
        with torch.no_grad(), autocast():
            test.forward({"data": x})

    def plain_test():
        with torch.no_grad(), autocast():
            plain_eval(x)

    plain.train()
    rows = {}
    for name, a, b in (("forward (TRAIN)", ours_fwd, plain_fwd), ("forward+backward", ours_fwd_bwd, plain_fwd_bwd),
                       ("update (SGD)", ours_update, plain_update), ("forward (TEST)", ours_test, plain_test)):
        # interleaved rounds, so load on a shared machine hits both sides alike
        ours_ms, plain_ms = [], []
        for _ in range(rounds):
            ours_ms.append(median_ms(a, repeat, sync))
            plain_ms.append(median_ms(b, repeat, sync))
        rows[name] = (statistics.median(ours_ms), statistics.median(plain_ms))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", nargs="+", default=["resnet18", "resnet50"], choices=sorted(DEPTHS))
    parser.add_argument("--batch", type=int, default=None, help="batch size [default: 64 ResNet-18/34, 32 ResNet-50]")
    parser.add_argument("--repeat", type=int, default=3, help="timed calls per measurement (median)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved ours/plain rounds (median)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", choices=sorted(AMP), default=None, help="CUDA only: autocast dtype")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.amp and device.type != "cuda":
        raise SystemExit("--amp needs --device cuda")
    if args.threads:
        torch.set_num_threads(args.threads)
    for arch in args.arch:
        batch = args.batch or BATCHES[arch]
        rows = bench(arch, batch, args.repeat, device, args.amp, args.rounds)
        print(f"{arch} {SIZE}x{SIZE} batch {batch} on {device}{' amp ' + args.amp if args.amp else ''} "
              f"({torch.get_num_threads()} threads): ms per iteration")
        print(f"  {'':18s} {'ours':>9s} {'plain':>9s} {'ratio':>6s}")
        total_ours = total_plain = 0.0
        for name, (o, p) in rows.items():
            print(f"  {name:18s} {o:9.1f} {p:9.1f} {o / p:6.2f}")
            if name in ("forward+backward", "update (SGD)"):
                total_ours, total_plain = total_ours + o, total_plain + p
        print(f"  {'train iteration':18s} {total_ours:9.1f} {total_plain:9.1f} {total_ours / total_plain:6.2f}")


if __name__ == "__main__":
    main()
