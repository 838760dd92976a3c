"""`pip install .` ships the schema and templates, and works from outside the repository."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

from conftest import REPO_ROOT

# Folders of the checkout that are not part of a source tree to install.
SKIP = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", "demo_work")
TEMPLATE_PACKAGES = {"prototxt_templates": "prototxt_templates", "jobs": "job_templates"}


def test_pip_install_outside_the_repository(tmp_path, reference):
    # Install from a copy, so concurrent runs never share an in-tree build folder.
    source = tmp_path / "src"
    shutil.copytree(REPO_ROOT, source, ignore=SKIP)
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(target), str(source)],
        check=True,
        capture_output=True,
        text=True,
    )
    package = target / "lymph_cv"
    assert (package / "formats" / "caffe" / "caffe.proto").is_file()
    assert (package / "pycaffe" / "compat" / "caffe" / "__init__.py").is_file()  # `lymph-cv pycaffe-path`
    assert not (target / "caffe").exists()  # never a top-level caffe that would shadow a real Caffe
    for repo_folder, name in TEMPLATE_PACKAGES.items():
        shipped = {p.name for p in (package / name).glob("*.j2")}
        in_repo = {p.name for p in (REPO_ROOT / repo_folder).glob("*.j2")}
        assert (package / name).is_dir() and in_repo <= shipped

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target)}
    probe = (
        "import json, lymph_cv, lymph_cv.core.resources as r;"
        "print(json.dumps([lymph_cv.__file__, str(r.prototxt_template_dir()), str(r.job_template_dir()),"
        " str(r.caffe_proto_path())]))"
    )
    run = subprocess.run([sys.executable, "-c", probe], cwd=outside, env=env, capture_output=True, text=True, check=True)
    paths = json.loads(run.stdout)
    assert all(path.startswith(str(target)) for path in paths), paths

    mean = reference / "DB_train_w32_1.binaryproto"
    run = subprocess.run(
        [sys.executable, "-m", "lymph_cv", "inspect", "--json", str(mean)],
        cwd=outside, env=env, capture_output=True, text=True,
    )
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["shape"] == [3, 36, 36]
