"""`make bench`: the benchmark program (see __main__.py) and its load generator (loadgen.py)."""
