"""Speed and memory benchmarks: each compares what it measures side by side in one run."""
