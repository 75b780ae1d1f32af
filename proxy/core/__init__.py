"""The sans-I/O core: the wire protocol, subscriptions, routing, per-client queues and sessions.

Nothing here imports Trio, prometheus-client or sockets, or touches files:
every module takes values and returns values, so each path is tested directly.
The shells in :mod:`proxy.net` and the wiring in :mod:`proxy.app` build on it.
"""
