"""What the machine has: host facts, the NVML and libcuda probes (run as children), the library search the loader would
do, Jetson files, the virtual packages conda and rattler would derive → ``Machine``.

May import: core.
"""
