"""tourray.runtime: a failed actor pool gives its CPUs back at once, whatever raised; a stage's process
keeps freed memory for reuse."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import time
import traceback

import pytest

from tourray.errors import UserError
from tourray.runtime import pool_batches


def failing_stage(how: str):
    """An actor stage (as capture's and tours' are) that fails on its third block, `how` it is told
    (made here, not at module level: Ray's workers cannot import a test module, so it goes by value)."""

    class FailsOnBlock2:
        def __call__(self, batch):
            if batch["id"][0] == 2:
                if how == "user":
                    raise UserError("block 2 names the bad input")
                raise ValueError("block 2 broke")
            return batch

    return FailsOnBlock2


def pipeline(ray, how: str):
    return ray.data.range(4, override_num_blocks=4).map_batches(failing_stage(how), batch_size=None, concurrency=1,
                                                                num_cpus=1)


def cpus_come_back(ray, free: float) -> bool:
    deadline = time.time() + 10
    while ray.available_resources().get("CPU") < free and time.time() < deadline:
        time.sleep(0.1)
    return ray.available_resources().get("CPU") >= free


def settled_cpus(ray) -> float:
    gc.collect()  # a pool an earlier test left for the collector would be freed inside this one
    time.sleep(1)
    return ray.available_resources().get("CPU")


@pytest.mark.parametrize("how", ["user", "ray"])
def test_a_failed_pool_frees_its_cpus_before_the_error_arrives(ray_session, how):
    free = settled_cpus(ray_session)
    seen = []
    with pytest.raises(UserError) as err:
        for b in pool_batches(pipeline(ray_session, how), on_ray_error=lambda e: UserError(f"gave up: {type(e).__name__}")):
            seen += b.column("id").to_pylist()
    assert 2 not in seen and len(seen) <= 2
    if how == "user":  # raised inside the actor: itself, not Ray's wrapper
        assert str(err.value) == "block 2 names the bad input"
    else:  # Ray's failure: what the caller makes of it
        assert str(err.value).startswith("gave up: ")
    assert err.value.__cause__ is None and err.value.__context__ is None  # unchained: no frame holds the pool
    assert cpus_come_back(ray_session, free) and err.value  # while the error is still held


def test_without_a_message_of_its_own_the_caller_gets_rays_error(ray_session):
    free = settled_cpus(ray_session)
    with pytest.raises(Exception, match="block 2 broke") as err:
        list(pool_batches(pipeline(ray_session, "ray")))
    assert type(err.value).__module__.startswith("ray") and not isinstance(err.value, UserError)
    assert cpus_come_back(ray_session, free) and err.value  # its frames no longer hold the pool
    held = [(type(x).__name__, f.f_code.co_name, sorted(f.f_locals)) for x in chain(err.value)
            for f, _ in traceback.walk_tb(x.__traceback__) if f.f_locals and f.f_code.co_name != "pool_batches" and f.f_code.co_filename != __file__]
    assert held == []  # nor do those of the exceptions chained to it: there are none (`_detached`)
    assert "Raised inside Ray Data at:" in "".join(err.value.__notes__)  # the lines, kept as text


def chain(e: BaseException) -> list[BaseException]:
    seen, todo = [], [e]
    while todo:
        if (x := todo.pop()) is not None and not any(x is y for y in seen):
            seen.append(x)
            todo += [x.__cause__, x.__context__]
    return seen


def test_a_consumer_that_stops_early_closes_the_pool(ray_session):
    """The capture driver and tours close the generator when their own loop fails (a lost lease, a commit)."""
    free = settled_cpus(ray_session)
    batches = pool_batches(pipeline(ray_session, "user"))
    assert next(batches).column("id").to_pylist() in ([0], [1])
    batches.close()
    assert cpus_come_back(ray_session, free)


# Three 12 MiB float64 temporaries alive at once, then freed: the pattern of a batch's work. glibc's default
# gives the heap's top back to the OS once it exceeds twice the largest freed block, so the next batch faults
# its pages in again; kept, the second and later rounds reuse them.
FAULTS = """
import resource, sys
import numpy as np
from tourray.runtime import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else None
def round_(k):
    xs = [np.ones((1536, 1024 + k)) for _ in range(3)]
    return sum(float(x[-1, -1]) for x in xs)
round_(0)
r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for k in range(1, 6):
    round_(k)
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)
"""


def faults(how: str = "keep", **env) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", FAULTS, how], env={**os.environ, **env}, capture_output=True, text=True,
                         check=True).stdout.split()
    return out[0], int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux") or not os.confstr("CS_GNU_LIBC_VERSION"), reason="glibc only")
def test_a_stage_process_reuses_freed_memory_unless_the_user_set_malloc():
    applied, tuned = faults()
    assert applied == "True"
    # 5 rounds x 3 x 12 MiB = 45,000 pages if each round faulted in afresh
    assert tuned < 2_000, f"{tuned} minor page faults in 5 rounds after the first"
    applied, _ = faults(MALLOC_TRIM_THRESHOLD_="131072")  # the user's own setting wins
    assert applied == "False"
    _, default = faults("default")  # glibc's own behaviour, for contrast: the test can tell
    assert default > 10 * max(tuned, 100), (default, tuned)
