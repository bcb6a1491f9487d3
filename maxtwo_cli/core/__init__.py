"""The core library shared by the CLI and the daemon.

NOTE: nothing here imports typer, rich, falcon, waitress or schedule: the core is plain
SQLAlchemy Core over SQLite or PostgreSQL, and both front ends translate to and from it.
"""
