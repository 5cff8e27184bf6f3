"""The pure parts of bench/prefix_cache.py and bench/dp_serving.py: the hit rate from /metrics counters over a
window, a SwitchReport's topology names read back, and the planner's price of a DP switch."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import dp_serving
import prefix_cache

from remp.model.families import config_from_hf
from remp.tools.random_model import tiny_config
from remp.topology import Topology

METRICS = """# HELP remp:prefix_cache_queries_total Prompt tokens looked up in the prefix cache
# TYPE remp:prefix_cache_queries_total counter
remp:prefix_cache_queries_total{replica="0"} 300.0
remp:prefix_cache_queries_total{replica="1"} 100.0
remp:prefix_cache_hits_total{replica="0"} 150.0
remp:prefix_cache_hits_total{replica="1"} 50.0
remp:prefix_cache_hits_created{replica="0"} 1.7e9
"""


def test_counters_sum_replicas_and_hit_rate_is_of_the_window():
    names = prefix_cache.COUNTERS["remp"]
    assert prefix_cache.parse_counters(METRICS, names) == (400.0, 200.0)
    with pytest.raises(RuntimeError, match="prefix_cache_queries_total"):
        prefix_cache.parse_counters("", names)
    assert prefix_cache.parse_counters("", names, required=False) == (0.0, 0.0)
    assert prefix_cache.hit_rate((100.0, 20.0), (400.0, 200.0)) == 0.6
    assert prefix_cache.hit_rate((400.0, 200.0), (400.0, 200.0)) is None
    samples = [(0.0, 0.0, 0.0), (1.0, 100.0, 10.0), (2.0, 200.0, 110.0), (3.0, 300.0, 210.0)]
    assert prefix_cache.window_rate(samples, 1.0, 2.0) == 1.0
    assert prefix_cache.window_rate(samples, 0.5, 1.5) == 0.55  # widened to the samples around the window
    rates = prefix_cache.switch_rates({"samples": samples}, 1.0, 2.0, 1.0)
    assert rates["before"] == 0.1 and rates["during"] == 1.0 and rates["whole_run"] == 0.7


def test_report_topology_names_read_back():
    for t in (Topology(2, 1), Topology(1, 1, dp=2), Topology(1, 2), Topology(2, 1, dp=2)):
        assert dp_serving.parse_topology(str(t)).shape == t.shape


def test_planner_price_of_a_dp_switch():
    """TP2 -> DP2xTP1: each worker receives the half of the weights it lacks (the minimum); back: nothing."""
    config = config_from_hf(tiny_config())
    report = {"old_topology": "TP2xPP1", "new_topology": "DP2xTP1xPP1", "mode": "stop", "kv_blocks_moved": 8}
    grow = dp_serving.predicted(config, 4, 16, 1e9, 0.5, report)
    assert grow["bytes_moved"]["weights"] == grow["min_bytes"]["weights"] > 0
    assert grow["slowest_receiver_bytes"]["weights"] == pytest.approx(grow["bytes_moved"]["weights"] / 2, rel=0.05)
    assert grow["pause_s"] > 0
    back = dp_serving.predicted(
        config, 4, 16, 1e9, 0.5, report | {"old_topology": "DP2xTP1xPP1", "new_topology": "TP2xPP1"}
    )
    assert back["bytes_moved"]["weights"] == back["min_bytes"]["weights"] == 0
    assert back["pause_s"] < grow["pause_s"]
