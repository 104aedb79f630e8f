"""The ``fer`` command line: thin wiring over fer_core, registry, serving and flows."""
