"""CPU thread policy, measured in one run: idle and next to a busy process (issue 16, item 7).

Each configuration runs in its own subprocess, because OpenMP reads ``OMP_WAIT_POLICY`` once,
when torch's thread pool starts. The workload is the demo model's forward pass (the built-in
``tpool_digits_vit`` on a batch of random pixels), ``--steps`` calls, timed after a warm-up. The competitor is ``--competitors`` plain Python busy loops (one per core it takes).

    python benchmarks/threads.py                 # threads = cores, 1 thread, PASSIVE; idle and loaded
    python benchmarks/threads.py --steps 40 --competitors 1

Prints seconds per configuration and the ratios that decide the policy (loaded / idle, and each
configuration against the default under load). Not a test: timings depend on the machine.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

WORK = """
import os, sys, time
import torch
torch.set_num_threads(int(sys.argv[1]))
import tpool_cli  # registers the demo model
from tpool_cli.models import load_model
net = load_model("tpool_digits_vit").model.eval()
x = torch.randn(int(sys.argv[3]), 3, 32, 32)
with torch.inference_mode():
    for _ in range(3):
        net(x)
    t0 = time.perf_counter()
    for _ in range(int(sys.argv[2])):
        net(x)
print(time.perf_counter() - t0)
"""
SPIN = "while True: pass"


def run(threads: int, policy: str | None, steps: int, batch: int) -> float:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    env["OMP_NUM_THREADS"] = str(threads)
    if policy:
        env["OMP_WAIT_POLICY"] = policy
    else:
        env["OMP_WAIT_POLICY"] = "ACTIVE"  # the default of libgomp, stated (tpool's own policy would pick PASSIVE)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run([sys.executable, "-c", WORK, str(threads), str(steps), str(batch)], env=env,
                          capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30, help="timed forward calls per configuration")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--competitors", type=int, default=1, help="busy processes in the loaded runs")
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    configs = [(f"{cores} threads, spin (ACTIVE)", cores, None), ("1 thread", 1, None),
               (f"{cores} threads, PASSIVE", cores, "PASSIVE")]
    results: dict[tuple[str, bool], float] = {}
    for loaded in (False, True):
        spinners = [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(args.competitors if loaded else 0)]
        try:
            time.sleep(0.5 if loaded else 0)
            for name, threads, policy in configs:
                results[(name, loaded)] = run(threads, policy, args.steps, args.batch)
        finally:
            for proc in spinners:
                proc.kill()
                proc.wait()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{cores} usable cores, {args.competitors} competing busy process(es), {args.steps} calls of batch "
          f"{args.batch}; 1-min load average at the end {load:.2f}")
    default_loaded = results[(configs[0][0], True)]
    print(f"{'configuration':<28} {'idle s':>8} {'loaded s':>9} {'loaded/idle':>12} {'vs default loaded':>18}")
    for name, _, _ in configs:
        idle, busy = results[(name, False)], results[(name, True)]
        print(f"{name:<28} {idle:>8.2f} {busy:>9.2f} {busy / idle:>11.2f}x {busy / default_loaded:>17.2f}x")


if __name__ == "__main__":
    main()
