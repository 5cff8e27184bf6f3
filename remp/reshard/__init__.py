"""A worker's side of a switch: the phases a plan is executed in (execute.py), the live pre-copy (live.py), and
the worker's handling of the driver's switch commands (on_worker.py)."""
