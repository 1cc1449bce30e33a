"""What the machine has → ``Machine`` (model): host facts (host), the NVML and libcuda probes run as children and
put together (detect), the library search the loader would do (libfind), Jetson files and table (jetson), the
virtual packages conda and rattler would derive (virtual), the one platform table (platforms), the detect table
for a person (render).

May import: core.
"""
