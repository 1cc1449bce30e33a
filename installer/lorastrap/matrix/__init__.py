"""Which environment fits: ``envs/profiles.yaml`` read into strict records, and ``Machine × Matrix → Plan`` (the
profile, every rule's verdict, the reasons, why-not) — a pure function.

May import: machine, core.
"""
