"""train/stop.py: the first signal only asks for a stop, a second one (or a checkpoint past its deadline) ends the
process at once with the shell's exit code. Each case runs in its own interpreter: os._exit cannot be caught.
(The loop's clean stop, checkpoint then exit 130/143, is tests/test_faults.py.)"""

import subprocess
import sys
import textwrap


def run(code: str):
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=60)


def test_the_first_signal_only_asks_and_a_second_one_exits_at_once():
    res = run("""
        import os, signal
        from hiermem.train.stop import StopSignals
        with StopSignals(lambda name: f"second {name}: exiting without the checkpoint") as stop:
            os.kill(os.getpid(), signal.SIGTERM)
            print("asked", stop.signum == signal.SIGTERM, flush=True)
            os.kill(os.getpid(), signal.SIGINT)
            print("not reached", flush=True)
    """)
    assert res.stdout == "asked True\n"
    assert res.stderr == "error: second SIGINT: exiting without the checkpoint\n"
    assert res.returncode == 130


def test_a_checkpoint_past_its_deadline_ends_the_process():
    res = run("""
        import time
        from hiermem.train.stop import deadline
        with deadline(0.5, lambda: "the checkpoint took longer than train.stop_timeout_s=0.5", 143):
            time.sleep(30)
        print("not reached")
    """)
    assert res.stdout == ""
    assert res.stderr == "error: the checkpoint took longer than train.stop_timeout_s=0.5\n"
    assert res.returncode == 143


def test_a_block_that_ends_in_time_cancels_the_deadline():
    res = run("""
        import time
        from hiermem.train.stop import deadline
        with deadline(0.3, lambda: "late", 143):
            pass
        time.sleep(0.6)
        print("done")
    """)
    assert (res.stdout, res.stderr, res.returncode) == ("done\n", "", 0)
