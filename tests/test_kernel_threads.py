"""The CPU kernels' own thread pool (kernels/cpu/thread_pool.h), driven through the AOT entry
points exactly as MindSpore calls them (ctypes, numpy buffers), so threads and timing are ours
alone: concurrent callers agree bit for bit with one caller, idle workers sleep instead of
spinning (libgomp's workers spun ~9 ms after every call here), and a forked child gets a pool.
"""
# pylint: disable=redefined-outer-name
import ctypes
import os
import shutil
import subprocess
import sys
import threading

import numpy as np
import pytest

from mindformers_lora_ext.kernels import build
from aot_abi import fused_forward, problem

pytestmark = pytest.mark.skipif(shutil.which(os.environ.get("CXX") or "g++") is None,
                                reason="no C++ compiler (g++ or $CXX): the CPU kernel cannot be built")


@pytest.fixture(scope="module")
def lib_path():
    return build.build_cpu_library()


def test_concurrent_callers_agree_with_one_caller(lib_path):
    """MindSpore may launch two kernels at once: a caller finding the pool busy runs alone;
    every result is bit-identical to an uncontended call (no shared scratch, no races)."""
    lib = ctypes.CDLL(lib_path)
    inputs = problem(300, 257, 130, 16)  # several row blocks and K blocks
    expected = fused_forward(lib, *inputs, 1.5, 0.2, (5, 9))
    results, errors = [], []

    def call():
        try:
            for _ in range(5):
                results.append(fused_forward(lib, *inputs, 1.5, 0.2, (5, 9)))
        except Exception as exc:  # pylint: disable=broad-except
            errors.append(exc)

    threads = [threading.Thread(target=call) for _ in range(4)]  # ctypes releases the GIL
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors and len(results) == 20
    for y, h in results:
        np.testing.assert_array_equal(y, expected[0])
        np.testing.assert_array_equal(h, expected[1])


DROPPED_SCRIPT = """
import ctypes, hashlib, sys
import numpy as np
sys.path.insert(0, sys.argv[2])
from aot_abi import aot
lib = ctypes.CDLL(sys.argv[1])
rng = np.random.default_rng(1)
# dz [200, 300] against W [300, 700]: 10 output chunks of 32; dx [200, 700]
dz, w = rng.standard_normal((200, 300)).astype(np.float32), rng.standard_normal((300, 700)).astype(np.float32)
dx, count = aot(lib, "DroppedMatmulBackward", [dz, np.array([0.1], np.float32), np.array([3, 8], np.int32), w],
                [np.zeros((200, 700), np.float32), np.zeros(1, np.float32)])
print(hashlib.sha256(dx.tobytes()).hexdigest(), int(count[0]), int((dx != 0).sum()))
"""


@pytest.mark.parametrize("threads", ["2", "3"])
def test_dropped_matmul_backward_is_the_same_on_any_number_of_threads(lib_path, threads):
    """DoRA's dropped-element backward sums its output chunks in fixed groups, not per thread:
    its dx is the same bit for bit on 1, 2 or 3 threads (MINDFORMERS_LORA_EXT_CPU_THREADS; a
    caller that finds the pool busy also runs alone)."""
    def run(n):
        done = subprocess.run([sys.executable, "-c", DROPPED_SCRIPT, lib_path, os.path.dirname(__file__)],
                              env=dict(os.environ, MINDFORMERS_LORA_EXT_CPU_THREADS=n), capture_output=True,
                              text=True, timeout=120, check=True)
        return done.stdout.split()

    digest, count, nonzero = run("1")
    assert 0.05 < int(count) / (200 * 700) < 0.15 and int(nonzero) > 0.9 * int(count)  # a real p = 0.1 draw
    assert run(threads) == [digest, count, nonzero]


IDLE_SCRIPT = '''
import ctypes, os, sys, threading, time
import numpy as np
sys.path.insert(0, sys.argv[2])
from aot_abi import fused_forward, problem
lib = ctypes.CDLL(sys.argv[1])
tick = os.sysconf("SC_CLK_TCK")

def cpu_seconds(tid):
    with open(f"/proc/self/task/{tid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / tick  # utime + stime

before = set(os.listdir("/proc/self/task"))
inputs = problem(256, 256, 256, 8)
expected = fused_forward(lib, *inputs, 2.0, 0.05, (1, 2))
workers = sorted(set(os.listdir("/proc/self/task")) - before)
me = str(threading.get_native_id())
start = {t: cpu_seconds(t) for t in workers + [me]}
calls, idle = 100, 0.01
for _ in range(calls):
    fused_forward(lib, *inputs, 2.0, 0.05, (1, 2))
    time.sleep(idle)  # MindSpore's own ops would run here
used = {t: cpu_seconds(t) - start[t] for t in workers + [me]}
print("workers", len(workers), "worker_cpu", sum(used[t] for t in workers), "main_cpu", used[me],
      "idle", calls * idle)

pid = os.fork()  # the child has none of the parent's worker threads: it must get a pool of its own
if pid == 0:
    y, h = fused_forward(lib, *inputs, 2.0, 0.05, (1, 2))
    os._exit(0 if np.array_equal(y, expected[0]) and np.array_equal(h, expected[1]) else 3)
deadline = time.time() + 60
while time.time() < deadline:
    done, status = os.waitpid(pid, os.WNOHANG)
    if done:
        print("child", os.waitstatus_to_exitcode(status))
        break
    time.sleep(0.05)
else:
    os.kill(pid, 9)
    print("child hung")
'''


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs Linux /proc per-thread CPU times")
def test_idle_workers_sleep_and_a_forked_child_gets_a_pool(lib_path, tmp_path):
    """Over 100 small calls each followed by 10 ms of idle time, the pool's workers use about as
    much CPU as the calling thread (their share of the work), not the idle time: they sleep
    after a short spin. Then a forked child calls the kernel and gets the same bits."""
    script = tmp_path / "idle.py"
    script.write_text(IDLE_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="2")
    done = subprocess.run([sys.executable, str(script), lib_path, os.path.dirname(__file__)], capture_output=True, text=True,
                          timeout=300, env=env, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    words = done.stdout.split()
    stats = {words[i]: words[i + 1] for i in range(0, len(words) - 1, 2) if words[i] != "child"}
    assert int(stats["workers"]) == 1, done.stdout  # OMP_NUM_THREADS=2: the caller and one worker
    worker, main, idle = float(stats["worker_cpu"]), float(stats["main_cpu"]), float(stats["idle"])
    # a spinning worker would add most of the 1 s of idle time (libgomp's default: about 0.9 s)
    assert worker - main < 0.3 * idle, done.stdout
    assert "child 0" in done.stdout, done.stdout
