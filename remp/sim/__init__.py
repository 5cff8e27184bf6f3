"""Discrete-event simulation of remp serving a workload: the real Scheduler, policy and planner, with step
times from a performance model instead of a model's weights."""
