"""Interpreter-start cost of the .pth hook, measured side by side in one run.

Prints the median self+cumulative import time of ``mindformers_lora_ext._boot`` reported by
``python -X importtime`` over N fresh interpreters, and the median wall time of
``python -c pass`` with the hook's .pth processed versus ``python -S`` (no site, no .pth).
"""
import statistics
import subprocess
import sys
import time

RUNS = int(sys.argv[1]) if len(sys.argv) > 1 else 20


def boot_import_us():
    out = subprocess.run([sys.executable, "-X", "importtime", "-c", "pass"],
                         capture_output=True, text=True, check=True).stderr
    for line in out.splitlines():
        if line.rstrip().endswith("mindformers_lora_ext._boot"):
            return int(line.split("|")[1])
    raise SystemExit("mindformers_lora_ext._boot was not imported at start: is the package installed?")


def wall_ms(args):
    start = time.perf_counter()
    subprocess.run([sys.executable] + args + ["-c", "pass"], check=True)
    return (time.perf_counter() - start) * 1e3


def main():
    boots = [boot_import_us() for _ in range(RUNS)]
    with_site, without_site = [], []
    for _ in range(RUNS):  # interleaved so that machine noise hits both alike
        with_site.append(wall_ms([]))
        without_site.append(wall_ms(["-S"]))
    boot, site_ms, bare_ms = statistics.median(boots), statistics.median(with_site), statistics.median(without_site)
    print(f"runs: {RUNS}")
    print(f"_boot import (cumulative, -X importtime): median {boot / 1000:.3f} ms")
    print(f"python -c pass: {site_ms:.1f} ms with site+.pth, {bare_ms:.1f} ms with -S; "
          f"hook share of a start: {boot / 1000 / site_ms:.2%}")


if __name__ == "__main__":
    main()
