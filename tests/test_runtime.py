"""tourray.runtime: a failed actor pool gives its CPUs back at once, whatever raised."""

from __future__ import annotations

import gc
import time

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


def test_a_consumer_that_stops_early_closes_the_pool(ray_session):
    """The capture driver and tours close the generator when their own loop fails (a lost lease, a commit)."""
    free = settled_cpus(ray_session)
    batches = pool_batches(pipeline(ray_session, "user"))
    assert next(batches).column("id").to_pylist() in ([0], [1])
    batches.close()
    assert cpus_come_back(ray_session, free)
