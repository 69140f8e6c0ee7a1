"""hiermem/bench/rss.py: the scale benchmarks' peak memory is RssAnon summed over a process tree; file-backed
pages of a memory-mapped file do not count."""

import subprocess
import sys

import numpy as np
import pytest

from hiermem.bench.rss import RssSampler, proc_status

pytestmark = pytest.mark.skipif("RssAnon" not in proc_status(), reason="needs /proc/self/status with RssAnon")


def test_the_sampler_sums_the_process_tree():  # it sees a grandchild's 120 MB of written pages
    child = ("import subprocess, sys; subprocess.run([sys.executable, '-c', "
             "'import time; x = bytes(1) * (120 << 20); time.sleep(0.6)'], check=True)")
    proc = subprocess.Popen([sys.executable, "-c", child])
    with RssSampler(proc.pid, interval=0.02) as rss:
        assert proc.wait() == 0
    assert rss.peak > 110 * 2**20 and rss.max_procs >= 2 and rss.samples >= 2


def test_anonymous_pages_count_and_mapped_file_pages_do_not(tmp_path):
    path = tmp_path / "f.npy"
    np.lib.format.open_memmap(path, "w+", np.uint8, (64 << 20,))[:] = 1
    base = proc_status()["RssAnon"]
    with RssSampler(interval=0.01) as mapped:  # default: this process
        m = np.load(path, mmap_mode="r")
        assert int(m[:: 4096].sum()) == 16384  # every page touched: resident, but file-backed
        del m
    with RssSampler(interval=0.01) as anon:
        a = np.ones(64 << 20, np.uint8)
        del a
    assert mapped.peak - base < 16 << 20 and anon.peak - base > 60 << 20, (base, mapped.peak, anon.peak)
