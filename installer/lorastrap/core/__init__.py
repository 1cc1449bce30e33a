"""The shared core every room stands on: what / why / fix errors and exit codes (errors), the one module that starts
processes (subproc), atomic files (fsutil), where things live (paths), records with committed schemas (records), the
versions (dotted numbers, PEP 440 and conda ordering: versions), file locks (locks), the one YAML reader (yamlio), what a check or a parse found,
kept for the next run (kept), a private server's credentials (credentials).

May import: nothing of lorastrap.
"""
