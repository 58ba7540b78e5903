"""SIGINT/SIGTERM handling that no moment of a run can lose.

Python runs a signal handler between two bytecodes of the main thread. The default SIGINT
handler raises ``KeyboardInterrupt`` there, and when those bytecodes belong to a
garbage-collector callback or a ``__del__`` (JAX registers ``_xla_gc_callback``), Python prints
"Exception ignored in ..." and carries on as if nothing had happened; SIGTERM's default kills
the process without a word. :class:`StopSignals` records every signal first. Outside the
training loop it then raises :class:`SignalReceived` at once (unless an import is running:
then at the next check, after it), and :meth:`StopSignals.check` raises it again at the next
safe point if it was swallowed; inside the loop (:meth:`StopSignals.deferred`) it only
records, and the loop stops at the next step boundary to save a checkpoint.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class SignalReceived(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived (a ``KeyboardInterrupt``, so that code which cleans up after
    Ctrl-C does so for SIGTERM too)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class StopSignals:
    """The SIGINT/SIGTERM handlers of one run, and the signals they have received.

    Handlers are process-wide: install them in an entry point (the CLI does, before JAX or
    TensorFlow start), or let ``flaxcnn.run.fit`` install them for the duration of a call.
    """

    def __init__(self) -> None:
        self.received: list[int] = []
        self._deferring = 0
        self._previous: dict[int, object] = {}
        self._previous_unraisablehook = None

    def install(self) -> bool:
        """Installs the handlers; returns False (and does nothing) outside the main thread."""
        if threading.current_thread() is not threading.main_thread():
            return False
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        self._previous_unraisablehook = sys.unraisablehook
        sys.unraisablehook = self._unraisable
        return True

    def uninstall(self) -> None:
        """Puts back the handlers that were there before :meth:`install`."""
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()
        if self._previous_unraisablehook is not None:
            sys.unraisablehook = self._previous_unraisablehook
            self._previous_unraisablehook = None

    @property
    def first(self) -> int | None:
        """The first signal received, if any."""
        return self.received[0] if self.received else None

    def _handle(self, signum: int, frame) -> None:
        self.received.append(signum)
        if not self._deferring and not _importing(frame):
            raise SignalReceived(self.received[0])

    def _unraisable(self, unraisable) -> None:
        # A SignalReceived raised inside a GC callback or __del__ cannot propagate; it is
        # recorded, and check() raises it at the next safe point: nothing to print.
        if isinstance(unraisable.exc_value, SignalReceived) and self.received:
            return
        self._previous_unraisablehook(unraisable)

    def check(self) -> None:
        """Raises :class:`SignalReceived` if a signal has arrived (a safe point)."""
        if self.received:
            raise SignalReceived(self.received[0])

    @contextlib.contextmanager
    def deferred(self) -> Iterator[list[int]]:
        """Within: signals are only recorded (the caller polls the yielded list)."""
        self.check()
        self._deferring += 1
        try:
            yield self.received
        finally:
            self._deferring -= 1


def _importing(frame) -> bool:
    """Whether ``frame`` runs inside an import. An exception raised there can leave a module
    half-initialised or turn into another error (a C extension's initialisation reports an
    ``ImportError``: numpy's does), so a signal during an import waits for the next
    :meth:`StopSignals.check`, right after it (TensorFlow's import takes seconds)."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False
