"""The lock: a profile's specs and virtual packages → a conda-lock file.  spec (the inputs), channels (sources,
mirrors), solve (py-rattler in a worker child, rattler_worker), wheels (tags from packaging.tags), pypi_index (the
simple-API reader), names (conda ↔ PyPI), uvexe (finding uv), pipside (pip entries resolved against the conda side),
lock (making one), lockfile (writing, reading, rewriting), choose (which lock an install uses), diff (what changed).

May import: matrix, machine, core.
"""
