"""maxtwo's benchmark harness (issue 4): `python -m bench` from the repository root.

Every benchmark runs against SQLite and PostgreSQL and is compared with a baseline measured in
the same run on the same machine; the results go to docs/performance.md, docs/bench-results.json
and PNG plots under docs/img/. One module per measured job:

- seed.py        1. seeding N users: the core vs the chunked INSERT of public implementations
- randomize.py   2. randomizing N users: the core vs the naive UPDATE, and the no-WAL floor
- scale.py       3. randomizing 1M..10M users on PostgreSQL, with a linear fit, and a search
                    for the largest table randomized within the 60 s interval
- load.py        4. GET / under wrk: `maxtwo serve` vs a hello-world app (on maxtwo's transport and on
                    stock waitress), and during randomizations
- memory.py      5. peak RSS of `maxtwo serve` under load and of `maxtwo seed`

and the machinery around them: options.py (flags), targets.py (fresh databases), baselines.py
(the public implementations' way), common.py (rounds, medians, failures), processes.py, wrk.py,
serve_log.py, hello.py, machine.py, goals.py, plots.py, report.py, run.py (the order of it all).
bench/NOTES.md is the hand-kept log of optimisation attempts that the report copies verbatim.
"""
