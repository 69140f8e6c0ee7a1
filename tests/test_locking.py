"""hiermem/locking.py: one writer per directory; a second one is refused naming the holder, and a lock left by a
killed process is taken over."""

import os
import signal
import socket
import subprocess
import sys

import pytest

from hiermem.config import load_config
from hiermem.errors import HiermemError
from hiermem.locking import DirLock

HOLD = ("import sys, time\nfrom hiermem.locking import DirLock\nheld = DirLock(sys.argv[1], 'train').acquire()\n"
        "print('locked', flush=True)\ntime.sleep(120)\n")


def _holder(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_process_is_refused_naming_the_holder(tmp_path):
    with DirLock(tmp_path, "prepare"):
        other = subprocess.run([sys.executable, "-c", "import sys\nfrom hiermem.locking import DirLock\n"
                                "DirLock(sys.argv[1], 'cluster').acquire()", str(tmp_path)], capture_output=True, text=True)
    assert other.returncode != 0
    last = other.stderr.strip().splitlines()[-1]
    holder = f"{tmp_path}: in use by another hiermem prepare (pid {os.getpid()} on {socket.gethostname()}, started "
    assert f"HiermemError: {holder}" in last and "wait for it to finish or stop it" in last
    DirLock(tmp_path, "cluster").acquire().release()  # free again once released


def test_a_lock_of_a_killed_process_is_taken_over(tmp_path, capfd):
    proc = _holder(tmp_path)
    with pytest.raises(HiermemError, match=rf"in use by another hiermem train \(pid {proc.pid} on "):
        DirLock(tmp_path, "train").acquire()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    lock = DirLock(tmp_path, "train").acquire()
    err = capfd.readouterr().err
    assert f"taking over the lock of train (pid {proc.pid} on {socket.gethostname()}" in err
    assert "which is no longer running" in err
    lock.release()
    assert (tmp_path / ".lock").read_bytes() == b""  # released: no holder left behind


def test_train_prepare_and_cluster_refuse_a_locked_directory(longtail_data, tmp_path):
    from hiermem.data.prepare import DataDir, prepare
    from hiermem.routing.clustering import cluster
    from hiermem.train.loop import Trainer

    cfg = load_config("tiny", [*longtail_data, "train.mode=scratch", f"train.run_dir={tmp_path / 'run'}"])
    with DirLock(cfg.run_dir, "train"):
        with pytest.raises(HiermemError, match=rf"^{tmp_path / 'run'}: in use by another hiermem train \(pid "):
            Trainer(cfg, progress=False)
    fresh = load_config("tiny", [*longtail_data, f"data.dir={tmp_path / 'data'}"])
    with DirLock(tmp_path / "data", "cluster"):
        with pytest.raises(HiermemError, match=rf"^{tmp_path / 'data'}: in use by another hiermem cluster"):
            prepare(fresh)
    data = DataDir(cfg.data_dir)
    with DirLock(data.path, "prepare"):
        with pytest.raises(HiermemError, match=rf"^{data.path}: in use by another hiermem prepare"):
            cluster(cfg, data, progress=False)
