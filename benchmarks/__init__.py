"""Benchmarks and the load test: tooling that drives a real server, kept out of the service package.

Run from a source checkout with the `bench` extra (`pip install -e ".[bench]"`), e.g.
`python -m benchmarks.concurrent_throughput`; the commands behind every published figure are in
docs/figures.md. `benchmarks.server_process` starts the shipped serve command for these and for
the tests. Benchmarks may import training code; the service never imports anything from here.
"""
