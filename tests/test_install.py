"""`pip install .` ships the schema and templates, and works from outside the repository."""
from __future__ import annotations

import json
import os
import re
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


def _ext_suffix() -> str:
    import sysconfig

    return sysconfig.get_config_var("EXT_SUFFIX")


def test_make_native_removes_a_module_older_than_its_source(tmp_path):
    """A stale native module was used as long as setuptools kept it (a failed rebuild left it in place)."""
    for name in ("Makefile", "setup.py", "setup.cfg", "pyproject.toml"):
        shutil.copy(REPO_ROOT / name, tmp_path / name)
    venv = tmp_path / "venv"
    venv.mkdir()
    stamp = venv / ".installed"
    stamp.touch()
    modules = {}
    sources = sorted((REPO_ROOT / "lymph_cv").glob("*/*.c"))
    # the Makefile takes every C source as an extension: setup.py declares each
    declared = set(re.findall(r'"(lymph_cv/[\w/]+\.c)"', (REPO_ROOT / "setup.py").read_text()))
    assert declared == {s.relative_to(REPO_ROOT).as_posix() for s in sources}
    for source in sources:
        copy = tmp_path / source.relative_to(REPO_ROOT)
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, copy)
        modules[source.stem] = copy.with_name(f"{source.stem}{_ext_suffix()}")
        modules[source.stem].write_bytes(b"")  # only its time matters to make
    base = (tmp_path / "setup.py").stat().st_mtime
    os.utime(stamp, (base + 10, base + 10))  # the venv is up to date
    for module in modules.values():  # newer than their sources: kept
        os.utime(module, (base + 20, base + 20))
    scan = modules["ldbscan"].with_name("ldbscan.c")
    os.utime(scan, (base + 30, base + 30))  # edited after its module was built

    def dry_run() -> str:
        done = subprocess.run(["make", "-n", "native", f"VENV={venv}", f"PYTHON={sys.executable}"], cwd=tmp_path,
                              capture_output=True, text=True, check=True)
        return done.stdout

    planned = dry_run()
    assert f"rm -f {modules['ldbscan'].relative_to(tmp_path)}\n" in planned
    assert f"rm -f {modules['ldbwrite'].relative_to(tmp_path)}" not in planned
    assert "setup.py -q build_ext --inplace" in planned
    os.utime(scan, (base, base))
    assert "rm -f" not in dry_run()
    os.utime(tmp_path / "setup.py", (base + 40, base + 40))  # other compiler flags: every module is stale
    planned = dry_run()
    assert all(f"rm -f {m.relative_to(tmp_path)}\n" in planned for m in modules.values())
