"""`pitcher bench`: what each transport costs on this machine, beside its floor.

``servers`` holds the echo servers (each run in its own process), ``probes``
the measuring clients, ``report`` the table and the chart, and ``runner``
puts them together. Everything binds loopback only and stops by itself.
"""
