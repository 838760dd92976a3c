"""Import modules in a background thread while the main thread waits in native code.

A command that ends by drawing a figure pays matplotlib's import (0.7–1 CPU s here) after its real
work.  Where that work runs in native code that releases the GIL and leaves a core idle part of the
time (torch's forward passes in ``lymph-cv evaluate``), the import can run meanwhile instead.
:class:`Preload` starts it; :meth:`Preload.wait` joins it before the modules are used, so the two
threads never import the same modules at once.  An import that fails in the background is logged
and left to fail again, with its real traceback, where the module is imported for use.
"""
from __future__ import annotations

import importlib
import logging
import threading
from typing import Optional, Sequence

log = logging.getLogger(__name__)


class Preload:
    """``modules`` imported in a daemon thread from :meth:`start` on; :meth:`wait` joins it."""

    def __init__(self, modules: Sequence[str]):
        self.modules = tuple(modules)
        self._thread: Optional[threading.Thread] = None

    def _run(self) -> None:
        for name in self.modules:
            try:
                importlib.import_module(name)
            except Exception as exc:  # noqa: BLE001  (imported again where used, which raises it)
                log.debug("preloading %s failed (%s); it is imported again where it is used", name, exc)
                return

    def start(self) -> None:
        """Start the imports (once; later calls do nothing)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="preload", daemon=True)
            self._thread.start()

    def wait(self) -> None:
        """Block until the imports are done (at once if they never started)."""
        if self._thread is not None:
            self._thread.join()
