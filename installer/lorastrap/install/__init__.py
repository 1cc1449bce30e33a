"""The install transaction: preflight → fetch and check every archive against the lock (the cache) → set the old
environment aside → link at the prefix with an engine → verify → commit or roll back; prefix facts, the journal,
generations and the registry, reading a bundle as a package source.

May import: locking, matrix, machine, core.
"""
