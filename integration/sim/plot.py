#!/usr/bin/env python3
"""Plots rollout_sim's per-minute series (CSV on stdin or argv[1]) into a PNG
(argv[2]): payload bandwidth and FleetLock request rate over time, one line per wave
schedule. Usage: plot.py SIM.csv OUT.png"""
import csv
import sys
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

series = defaultdict(lambda: ([], [], []))
with open(sys.argv[1]) as f:
    for row in csv.DictReader(f):
        t, mb, lk = series[row["schedule"]]
        t.append(int(row["minute"]) / 60)
        mb.append(float(row["MB_per_s"]))
        lk.append(int(row["lock_req_per_min"]))

fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
for name, (t, mb, lk) in series.items():
    top.plot(t, mb, label=name, linewidth=1)
    bottom.plot(t, lk, label=name, linewidth=1)
top.set_ylabel("payload MB/s (per-minute mean)")
top.set_yscale("symlog")
bottom.set_ylabel("FleetLock requests / min")
bottom.set_yscale("symlog")
bottom.set_xlabel("hours after publication")
top.set_title("10,000 simulated nodes, good release: policy::decide under a simulated clock")
top.legend(title="wave schedule", fontsize=8)
fig.tight_layout()
fig.savefig(sys.argv[2], dpi=110)
