"""Regenerate docs/triton.md from docs/triton.md.in with a fresh kernel_report and estimate run.

    PYTHONPATH=. python docs/make_triton_md.py
"""
import os
import subprocess
import sys

here = os.path.dirname(os.path.abspath(__file__))
env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
report = subprocess.run([sys.executable, "-m", "palora_kernels.tools.kernel_report"], env=env,
                        capture_output=True, text=True)
estimate = subprocess.run([sys.executable, os.path.join(here, "..", "benchmarks", "estimate_h100.py")],
                          env=env, capture_output=True, text=True, check=True)
summary = report.stdout.strip().splitlines()[-1]
rows = summary.split(" kernel/config/arch rows, ")
status = f"{rows[0]} rows, {rows[1].split(',')[0]}" if len(rows) == 2 else summary
text = open(os.path.join(here, "triton.md.in")).read()
text = (text.replace("@REPORT@", report.stdout.rstrip()).replace("@ESTIMATE@", estimate.stdout.rstrip())
        .replace("@ROWS@", status + (" (exit 0)" if report.returncode == 0 else f" (exit {report.returncode})")))
open(os.path.join(here, "triton.md"), "w").write(text)
print(status, "exit", report.returncode)
