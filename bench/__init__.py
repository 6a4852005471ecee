"""Kiln's benchmark suite (``make bench`` = ``.venv/bin/python -m bench``).

Every case runs Kiln the way production serves it (gunicorn with ``KILN_*`` variables,
PostgreSQL, Redis, a real worker where builds happen) and measures it from a separate process
with real clients (wrk for HTTP, curl for transfers), against a baseline run in the same
invocation on the same machine. ``python -m bench --help`` lists the cases; the table at the
end says, per case, what was measured, the baseline, the ratio, the goal and whether it was met.
Raw numbers go to ``bench/results/<timestamp>.json``; ``docs/benchmarks.md`` keeps the history.
"""
