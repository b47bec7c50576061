"""Subprocess side of test_preemption.py: one of two ``jax.distributed`` processes that step
(no model) and ask the guard after each step, as the train loop does.

python tests/_preemption_worker.py PORT PROCESS_ID

Prints READY at step 5, then ``stopped at step S by NAME`` (or ``not stopped``). The
repository root must be importable (the test puts it on PYTHONPATH).
"""

import sys
import time

import jax

from ucofia_jax.runtime import distributed
from ucofia_jax.training import checkpoints

STEPS = 600  # 0.05 s each: the notice reaches the other process within a few seconds


def main():
    port, pid = int(sys.argv[1]), int(sys.argv[2])
    distributed.maybe_initialize(
        coordinator_address=f"localhost:{port}", num_processes=2, process_id=pid
    )
    guard = checkpoints.PreemptionGuard()
    print("synced", guard.synced, jax.process_count(), flush=True)
    for step in range(1, STEPS + 1):
        time.sleep(0.05)
        if step == 5:
            print("READY", flush=True)
        if guard.stop_at(step):
            print(f"stopped at step {step} by {guard.signal_name}", flush=True)
            break
    else:
        print("not stopped", flush=True)
    guard.restore()
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
