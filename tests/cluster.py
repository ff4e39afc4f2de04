"""The in-process cluster the tests use lives in the package (the benches' --tiny runs use it)."""

from pearl.cluster import Cluster

__all__ = ["Cluster"]
