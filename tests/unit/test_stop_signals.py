"""The trainer's stop flag: SIGTERM, SIGUSR1 and a first Ctrl-C checkpoint at the next step end
instead of raising wherever the process is (a KeyboardInterrupt thrown into DALI's iteration can
deadlock it); a second Ctrl-C interrupts at once."""

import pytest

from tests.harness import run_distributed


def signal_twice(signum_name: str):
    import os
    import signal

    from ov2_megatron.training.loop import StopRequested

    signum = getattr(signal, signum_name)
    stop = StopRequested()
    os.kill(os.getpid(), signum)
    first = stop.signal == signum
    try:
        os.kill(os.getpid(), signum)
        second = "flag"
    except KeyboardInterrupt:
        second = "interrupted"
    return first, second


@pytest.mark.parametrize("name,second", [("SIGINT", "interrupted"), ("SIGTERM", "flag"),
                                         ("SIGUSR1", "flag")])
def test_first_signal_sets_the_flag(name, second):
    assert run_distributed(signal_twice, 1, args=(name,)) == [(True, second)]
