"""Helpers for the slide-evaluation tests: small pyramidal TIFF slides and a seeded ResNet deploy net
with random weights (a real net, its weights written as a caffemodel)."""
from __future__ import annotations

from pathlib import Path
from typing import Tuple

import numpy as np

from netutil import write_lists

#: Microns per pixel of level 0 of the test slides.
MPP = 0.5


def write_slide(path: Path, rgb: np.ndarray, levels: Tuple[int, ...] = (1, 2, 4), tile: int = 128) -> Path:
    """A pyramidal tiled TIFF (deflate tiles, resolution in pixels per centimetre) OpenSlide opens."""
    import tifffile

    path.parent.mkdir(parents=True, exist_ok=True)
    with tifffile.TiffWriter(path) as writer:
        for down in levels:
            writer.write(np.ascontiguousarray(rgb[::down, ::down]), tile=(tile, tile), compression="deflate",
                         photometric="rgb", subfiletype=0 if down == 1 else 1, resolutionunit="CENTIMETER",
                         resolution=(1e4 / (MPP * down), 1e4 / (MPP * down)))
    return path


def island_slide(size: int, seed: int, dark: bool) -> np.ndarray:
    """White glass with one pink tissue island holding a hole; ``dark`` islands are denser purple."""
    rng = np.random.default_rng(seed)
    rgb = np.full((size, size, 3), 244, np.uint8)
    yy, xx = np.mgrid[:size, :size]
    island = (yy - size * 0.5) ** 2 / (size * 0.32) ** 2 + (xx - size * 0.45) ** 2 / (size * 0.3) ** 2 < 1
    hole = (yy - size * 0.5) ** 2 + (xx - size * 0.5) ** 2 < (size * 0.06) ** 2
    tissue = island & ~hole
    colour = np.array((120, 50, 150) if dark else (225, 120, 180), np.float32)
    noise = rng.normal(0, 12, (size, size, 1))
    rgb[tissue] = np.clip(colour + noise[tissue], 0, 255).astype(np.uint8)
    return rgb


def random_net(workdir: Path, patch: int, classes: int = 2, arch: str = "resnet18", seed: int = 0
               ) -> Tuple[Path, Path, Path]:
    """(deploy, caffemodel, mean) of fold 1 of ``workdir``: rendered for ``arch`` on ``patch``-pixel
    patches, weights from the layers' fillers under ``seed``, a flat grey mean."""
    import torch

    from lymph_cv.formats.caffe import caffe_pb2
    from lymph_cv.formats.caffe.blob import array_to_blob
    from lymph_cv.formats.caffe.model import write_caffemodel
    from lymph_cv.formats.caffe.prototxt import read_net_prototxt
    from lymph_cv.net.build import build_net
    from lymph_cv.stages.render import render_fold

    write_lists(workdir, (1,), train_lines=4, test_lines=4, classes=classes)
    mean = workdir / "DB_train_w32_1.binaryproto"
    mean.write_bytes(array_to_blob(np.full((1, 3, patch, patch), 128.0, np.float32)).SerializeToString())
    rendered = render_fold(workdir, 1, arch=arch)
    net = build_net(read_net_prototxt(rendered.deploy), caffe_pb2.TEST)
    net.init_params(torch.Generator().manual_seed(seed))
    for layer in net.layers:  # unit variance: Caffe's zero statistics would scale by 1/sqrt(eps) per layer
        if layer.param.type == "BatchNorm":
            layer.blobs[1].data.fill_(1.0)
            layer.blobs[2].data.fill_(1.0)
    model = workdir / "1" / "random_iter_1.caffemodel"
    write_caffemodel(model, net.export_weights())
    return rendered.deploy, model, mean
