"""Day two: doctor and repair, explain, update and rollback, list and uninstall, run / shell-hook / shell.

May import: install, locking, matrix, machine, core.
"""
