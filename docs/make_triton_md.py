"""Regenerate docs/triton.md (and docs/kernel_report.txt) from docs/triton.md.in with a fresh
kernel_report and estimate run, or with a kernel_report output saved earlier (it takes minutes).

    PYTHONPATH=. python docs/make_triton_md.py [--report SAVED_OUTPUT]
"""
import os
import subprocess
import sys

here = os.path.dirname(os.path.abspath(__file__))
env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
if "--report" in sys.argv:
    saved = open(sys.argv[sys.argv.index("--report") + 1]).read()
    report = subprocess.CompletedProcess([], 0 if " 0 failing" in saved else 1, stdout=saved.split("\nrc=")[0])
else:
    report = subprocess.run([sys.executable, "-m", "palora_kernels.tools.kernel_report"], env=env,
                            capture_output=True, text=True)
open(os.path.join(here, "kernel_report.txt"), "w").write(report.stdout.rstrip() + "\n")
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
