"""Experiments built on jaxbag (not part of the installed library)."""
