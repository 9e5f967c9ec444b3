"""regsearch's own regularizers, registered through the package's entry points like any plugin."""
