"""flaxcnn.interrupts with real signals: a signal that lands in a garbage-collector callback
(where JAX's ``_xla_gc_callback`` runs) is kept, not lost; end-to-end stops of the CLI at
several moments of start-up are in ``test_reliability.py``."""

from __future__ import annotations

import gc
import importlib
import signal

import pytest

from flaxcnn import interrupts


@pytest.fixture
def stop_signals():
    signals = interrupts.StopSignals()
    assert signals.install()
    yield signals
    signals.uninstall()


def test_a_signal_inside_a_gc_callback_is_recorded_silently_and_raised_at_the_next_check(
    stop_signals, capfd
):
    def collecting(phase, info):  # the moment _xla_gc_callback would be running
        if phase == "start":
            signal.raise_signal(signal.SIGINT)

    gc.callbacks.append(collecting)
    try:
        gc.collect()  # the handler's SignalReceived is raised inside the callback: swallowed
    finally:
        gc.callbacks.remove(collecting)
    assert stop_signals.received == [signal.SIGINT]
    assert "Exception ignored" not in capfd.readouterr().err
    with pytest.raises(interrupts.SignalReceived) as raised:
        stop_signals.check()
    assert raised.value.signum == signal.SIGINT


def test_sigterm_raises_at_once_outside_and_is_only_recorded_inside_deferred(stop_signals):
    with pytest.raises(interrupts.SignalReceived) as raised:
        signal.raise_signal(signal.SIGTERM)
        pytest.fail("SIGTERM did not stop the code it interrupted")
    assert raised.value.signum == signal.SIGTERM and isinstance(raised.value, KeyboardInterrupt)

    stop_signals.received.clear()
    with stop_signals.deferred() as received:
        signal.raise_signal(signal.SIGINT)
        assert received == [signal.SIGINT]  # the loop polls this at its next step boundary
    with pytest.raises(interrupts.SignalReceived):
        stop_signals.check()


def test_uninstall_restores_the_previous_handlers():
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    signals = interrupts.StopSignals()
    signals.install()
    assert signal.getsignal(signal.SIGINT) != before[0]
    signals.uninstall()
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_a_signal_during_an_import_lets_the_import_finish_then_stops(
    stop_signals, tmp_path, monkeypatch
):
    """Raised inside an import, the stop could become an ImportError (numpy's C extension
    reported one when Ctrl-C landed while JAX was being imported): it waits for the import."""
    (tmp_path / "module_signalled_while_importing.py").write_text(
        "import signal\nsignal.raise_signal(signal.SIGINT)\nFINISHED = True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("module_signalled_while_importing")
    assert module.FINISHED and stop_signals.received == [signal.SIGINT]
    with pytest.raises(interrupts.SignalReceived):
        stop_signals.check()
