"""The in-process cluster the tests use lives in the package (pearl bench --tiny uses it too)."""

from pearl.cluster import Cluster

__all__ = ["Cluster"]
