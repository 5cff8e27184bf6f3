"""The driver's side of a topology switch: the state machine the engine advances between its steps
(on_driver.py), recovery from a lost worker (recovery.py), the report (report.py), and the narrow view of the
engine they work through (host.py). The plans come from planner/, the workers' side is reshard/."""
