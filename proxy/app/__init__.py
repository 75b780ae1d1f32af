"""The wiring: configuration read from the environment, a tier as one nursery tree, the
Prometheus exposition, and the command line (``trio-run``)."""
