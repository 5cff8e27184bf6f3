"""Everything about changing topology: the pure planner (plan.py), the worker-side phases (execute.py), the live
pre-copy (live.py), the worker's and the driver's side of a switch (on_worker.py, on_driver.py), and the
report (report.py). A new strategy is a new worker-side module driven by the same three commands."""
