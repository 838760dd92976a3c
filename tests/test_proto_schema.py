"""The committed caffe_pb2.py must be what caffe.proto compiles to (run `make proto` when not)."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from lymph_cv.formats.caffe import caffe_pb2
from lymph_cv.core.resources import caffe_proto_path

STALE = "lymph_cv/formats/caffe/caffe_pb2.py is stale: run `make proto`"


def _serialized_descriptor(module_source: str) -> bytes:
    """The serialized FileDescriptorProto a generated ``*_pb2.py`` registers."""
    for node in ast.walk(ast.parse(module_source)):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "AddSerializedFile":
            return ast.literal_eval(node.args[0])
    raise AssertionError("no AddSerializedFile(...) call in the generated module")


def _compile(proto_dir, out_dir) -> bytes:
    """Serialized descriptor of ``proto_dir/caffe.proto`` as grpc_tools' protoc generates it."""
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{proto_dir}", f"--python_out={out_dir}", "caffe.proto"],
        check=True,
        capture_output=True,
    )
    return _serialized_descriptor((out_dir / "caffe_pb2.py").read_text())


def _committed() -> bytes:
    # The runtime re-serializes descriptors differently, so compare the module's own literal.
    return _serialized_descriptor(Path(caffe_pb2.__file__).read_text())


def test_generated_module_matches_schema(tmp_path):
    assert Path(caffe_pb2.__file__).parent == caffe_proto_path().parent
    assert _compile(caffe_proto_path().parent, tmp_path) == _committed(), STALE


def test_an_edited_schema_is_detected(tmp_path):
    # The comparison above must be able to fail: an extra field changes the descriptor.
    text = caffe_proto_path().read_text()
    edited = text.replace("message Datum {", "message Datum {\n  optional int32 extra_field = 99;", 1)
    assert edited != text
    (tmp_path / "caffe.proto").write_text(edited)
    assert _compile(tmp_path, tmp_path) != _committed()
