"""core.preload: modules imported in a background thread, joined before use."""
from __future__ import annotations

import logging
import sys

from lymph_cv.core.preload import Preload


def test_preload_imports_in_the_background_and_wait_joins():
    sys.modules.pop("wave", None)
    preload = Preload(["wave"])
    preload.wait()  # not started: returns at once
    assert "wave" not in sys.modules
    preload.start()
    preload.start()  # once
    preload.wait()
    assert "wave" in sys.modules


def test_a_failed_preload_is_logged_and_left_to_the_real_import(caplog):
    sys.modules.pop("colorsys", None)
    with caplog.at_level(logging.DEBUG, logger="lymph_cv.core.preload"):
        preload = Preload(["lymph_cv_no_such_module", "colorsys"])
        preload.start()
        preload.wait()
    assert "lymph_cv_no_such_module" in caplog.text
    assert "colorsys" not in sys.modules  # the imports stop at the first failure
