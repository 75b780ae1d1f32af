"""The benchmark harness behind ``scripts/bench``: separate processes for every part.

``sim_process`` runs the simulator with pre-built frames and takes ``mark`` commands
on standard input; ``client_process`` holds the benchmark clients; ``runner``
starts everything, measures CPU and memory per tier from ``/proc``, and reports.
"""
