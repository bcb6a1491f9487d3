"""Development helpers shared by tests/ and bench/ (a throwaway PostgreSQL server).

Not shipped: pyproject.toml's [tool.setuptools] packages leaves it out of the wheel. Both
tests/ and bench/ import it from the repository root, which is on sys.path when they run.
"""
