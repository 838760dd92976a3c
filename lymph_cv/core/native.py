"""The one switch of the optional C extensions (setup.py ``NATIVE``): ``LYMPH_CV_NATIVE=0`` in the
environment turns every one of them off, and their pure paths run with the same results.  Only
``os`` is imported: the data tools' start-up path loads this module."""
import os

#: Environment variable: "0" turns the native modules off.
NATIVE_ENV = "LYMPH_CV_NATIVE"


def native_enabled() -> bool:
    """Whether the native modules may be used (each may still be unbuilt: the caller checks its import)."""
    return os.environ.get(NATIVE_ENV, "1").strip() != "0"
