"""The lock: a profile's specs and virtual packages → a conda-lock file (solved by py-rattler in a worker child; the
pip side resolved against the conda side), read, written, diffed, chosen, mirrored.

May import: matrix, machine, core.
"""
