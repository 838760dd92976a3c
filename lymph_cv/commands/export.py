"""``lymph-cv export``: a trained Caffe model and its deploy net → ONNX, checked in onnxruntime."""
from __future__ import annotations

from pathlib import Path

import click

from lymph_cv.commands.defaults import DEFAULT_OPSET, MIN_OPSET
from lymph_cv.errors import EvaluationError

#: Largest accepted difference between onnxruntime and our forward pass, relative to a blob's
#: largest magnitude (float32 sums in another order differ by ~1e-6).
CHECK_TOLERANCE = 1e-5

_FILE = click.Path(dir_okay=False, exists=True, path_type=Path)


@click.command()
@click.argument("model", type=_FILE)
@click.argument("deploy", type=_FILE)
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True, help="ONNX file to write.")
@click.option("--opset", type=click.IntRange(min=MIN_OPSET), default=DEFAULT_OPSET, show_default=True,
              help="ONNX operator set version.")
@click.option("--check/--no-check", default=True, show_default=True,
              help="Run the export in onnxruntime on a random batch and compare every blob with our forward pass.")
def export(model: Path, deploy: Path, output: Path, opset: int, check: bool) -> None:
    """Export MODEL.caffemodel with its DEPLOY.prototxt to ONNX (batch size free), checked in onnxruntime.

    The model then runs without Caffe (onnxruntime, OpenCV's dnn, TensorRT and others).  The input
    blob keeps its name and layout (N×C×H×W, BGR, mean subtracted as for Caffe); the output is the
    deploy net's (e.g. prob)."""
    # the exporter needs torch (seconds to load): not for --help
    from lymph_cv.net.onnx_export import computed_blobs, load_trained, save, to_onnx, verify

    net = load_trained(deploy, model)
    onnx_model = to_onnx(net, opset)
    if check:
        result = verify(net, to_onnx(net, opset, outputs=computed_blobs(net)))
        worst = max(result.blobs, key=result.blobs.get)
        if result.max_rel_diff > CHECK_TOLERANCE:
            raise EvaluationError(f"onnxruntime differs from our forward pass by {result.max_rel_diff:.2e} "
                                  f"(relative, blob {worst!r}), more than {CHECK_TOLERANCE:g}; nothing written", output)
        outputs = ", ".join(f"{b} {result.blobs[b]:.2e}" for b in net.output_blobs)
        click.echo(f"checked in onnxruntime on a batch of {result.batch}: max |difference| {outputs}; "
                   f"over all {len(result.blobs)} blobs {result.max_rel_diff:.2e} relative", err=True)
    save(onnx_model, output)
    click.echo(str(output))
