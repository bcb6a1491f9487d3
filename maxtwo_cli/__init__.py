"""maxtwo: the points service and its command-line tool."""

__version__ = "0.1.0"
