"""The trainer's stop flag: SIGTERM, SIGUSR1 and a first Ctrl-C checkpoint at the next step end
instead of raising wherever the process is (a KeyboardInterrupt thrown into DALI's iteration can
deadlock it), and say so at once; a second Ctrl-C interrupts at once, except while a checkpoint
is written: that one completes first."""

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


def ctrl_c_during_a_save():
    import os
    import signal
    import tempfile

    from ov2_megatron.training import process_lifetime
    from ov2_megatron.training.loop import StopRequested

    with tempfile.TemporaryFile() as err:
        saved_fd = os.dup(2)
        os.dup2(err.fileno(), 2)
        try:
            StopRequested()
            os.kill(os.getpid(), signal.SIGINT)
            with process_lifetime.checkpoint_in_progress():
                os.kill(os.getpid(), signal.SIGINT)  # waits for the save
                during = "completed"
            try:
                os.kill(os.getpid(), signal.SIGINT)
                after = "flag"
            except KeyboardInterrupt:
                after = "interrupted"
        finally:
            os.dup2(saved_fd, 2)
        err.seek(0)
        return during, after, err.read().decode()


def test_a_second_ctrl_c_lets_a_checkpoint_complete():
    during, after, said = run_distributed(ctrl_c_during_a_save, 1)[0]
    assert (during, after) == ("completed", "interrupted")
    assert said.splitlines() == [
        "ov2-train: SIGINT received: the run stops after this step, with a checkpoint (Ctrl-C "
        "again to interrupt at once)",
        "ov2-train: a checkpoint is being written: it completes first, then the run stops"]
