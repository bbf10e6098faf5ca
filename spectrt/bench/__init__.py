"""Latency benchmarks: workloads, the runner (same-run plain baseline), reports and plots."""
