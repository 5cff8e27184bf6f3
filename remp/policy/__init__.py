"""Choosing the topology from the load: a performance model of step time, predictions per candidate, and a
policy that weighs the gain against the switch's cost."""
