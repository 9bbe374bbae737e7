"""fitserve benchmarks: serving and training measured against references in the same run.

Every target in bench/README.md is a ratio against a reference this harness starts
itself, on the same machine, in the same run. Benchmarks are not tests: nothing here
asserts a timing; the summary prints each ratio next to its target, PASS or MISS.
"""
