"""emflow benchmarks: per-core limits, end-to-end runs, peers, scaling and overhead.

Run ``python -m benchmarks`` (``--quick`` for a smoke size) from the repository root. It
writes ``benchmarks/out/results.json`` (git-ignored) and regenerates the committed
``benchmarks/RESULTS.md``. Speed is reported as ratios to limits or peers measured in the
same run, never asserted (../shared/DESIGN.md "Testing and measuring").
"""
