"""
The plugin contract (hookspecs, loader, source/sink contracts) and the built-in sinks.

Plugin authors import the public names from ``batchd`` itself; this package holds
the modules they are defined in and exports nothing of its own, so there is one
list of public names, not two.
"""
