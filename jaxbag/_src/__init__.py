"""Private implementation modules of jaxbag; import from ``jaxbag`` instead."""
