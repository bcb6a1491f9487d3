"""maxtwo's HTTP daemon: the Falcon app, the minutely randomizer and the process around them.

NOTE: ``daemon`` is also python-daemon's import name; maxtwo never depends on that package and
tests/test_cli.py (test_the_daemon_package_is_ours_not_python_daemon) checks that this is the
module that gets imported.
"""
