"""The benchmarks: each module is a runnable benchmark, run from the repository root as `python -m bench.<name>`.

`python -m bench.run_all` runs them all (`make bench`). `bench.harness` starts the servers under test and is
shared with the end-to-end tests (tests/e2e); `bench.results` holds percentiles and the result files.
"""
