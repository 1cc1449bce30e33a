"""Fleets: offline bundles (made here, read by install), one node's run, and Slurm jobs over many nodes; the reports
Ansible and Slurm runs leave.

May import: install, locking, matrix, machine, core.
"""
