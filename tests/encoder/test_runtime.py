"""encoder.runtime: freed activation memory is reused instead of being faulted in again on every forward."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's interface"
)

# Allocates and frees a 48 MiB block (bigger than glibc's largest automatic mmap threshold, 32 MiB, like a
# batch's early activations) ten times, in the main thread and then in a new thread (which glibc would give
# an arena of its own), and counts the page faults after each one's first round.
PROBE = """
import json, resource, threading
from encoder.runtime import reuse_freed_memory
applied = reuse_freed_memory()
assert reuse_freed_memory() == applied  # once per process

def faults_per_round(out, key):
    block = bytearray(48 * 1024 * 1024); del block
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        block = bytearray(48 * 1024 * 1024); del block
    out[key] = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10

out = {"applied": applied}
faults_per_round(out, "main")
thread = threading.Thread(target=faults_per_round, args=(out, "thread")); thread.start(); thread.join()
print(json.dumps(out))
"""


def run_probe(**env: str) -> dict:
    environment = {k: v for k, v in os.environ.items() if k not in ("OMNIATTR_KEEP_MALLOC", "LD_PRELOAD")}
    environment.update(env)
    result = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, env=environment, check=True, timeout=60
    )
    return json.loads(result.stdout)


@pytest.mark.slow
def test_freed_blocks_are_reused_without_page_faults():
    tuned = run_probe()
    assert tuned["applied"] is True
    assert tuned["main"] < 100 and tuned["thread"] < 100  # the freed 48 MiB stays mapped and is reused


@pytest.mark.slow
def test_opting_out_leaves_malloc_alone():
    untouched = run_probe(OMNIATTR_KEEP_MALLOC="1")
    assert untouched["applied"] is False
    # 48 MiB / 4 KiB pages = 12,288 faults, every round, in both threads
    assert untouched["main"] > 5000 and untouched["thread"] > 5000
