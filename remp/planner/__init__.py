"""Pure planning, no tensors and no processes: the plan of pieces for a switch, a load or a recovery
(plan.py), the topologies a pool can run (choose.py), and the switch modes as strategy values (mode.py)."""
