"""The workflow bench/jobqueue.py runs in its hosts (LEVQOR_WORKFLOWS=bench.workflows)."""

import time

import engine


# Spends nothing, like the built-ins: nothing is reserved for it at intake.
@engine.workflow("bench.noop", timeout=10, max_cost=0)
def noop(payload, ctx):
    """Does nothing, and says when it started by this machine's clock: the
    clock every process here reads (the benchmark's client too)."""
    return {"started": time.time()}
