"""The benchmarks, the soak and the A/B tool: `pearl bench latency|load|serve` (benchmarks/cli.py)
and modules run with `python -m benchmarks.NAME` (ab, soak, prefix_cache, replicas, step_times).

They drive the product from outside, as its users do: service processes (pearl/procs.py), the
client (pearl/client.py), the in-process cluster (pearl/cluster.py). Nothing in the product
imports them; their own dependencies are the `bench` extra.
"""
