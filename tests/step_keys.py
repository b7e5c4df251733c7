"""Bad step-contribution arguments and the field each error must name: the Store and the Client
refuse the same ones (tests/store/test_steps.py, tests/server/test_steps_rpc.py)."""

BAD_KEYS = [
    (dict(step=0), "rank"),
    (dict(step=0, rank=0), "world_size"),
    (dict(step=0, world_size=2), "rank"),
    (dict(rank=0), "step"),
    (dict(rank=1), "step"),
    (dict(rank=0, run=""), "step"),
    (dict(rank=0, world_size=2), "step"),
    (dict(world_size=2), "step"),
    (dict(run="job"), "run"),
    (dict(step=0, rank=2, world_size=2), "rank"),
    (dict(step=0, rank=-1, world_size=2), "rank"),
    (dict(step=-1, rank=0, world_size=2), "step"),
    (dict(step=1.0, rank=0, world_size=2), "step"),
    (dict(step=True, rank=0, world_size=2), "step"),
    (dict(step=2**62 + 1, rank=0, world_size=2), "step"),
    (dict(step=2**63, rank=0, world_size=2), "step"),
    (dict(step=0, rank=0, world_size=0), "world_size"),
    (dict(step=0, rank=0, world_size=2**31), "world_size"),
    (dict(step=0, rank="0", world_size=2), "rank"),
    (dict(step=0, rank=0, world_size=2, run=5), "run"),
    (dict(step=0, rank=0, world_size=2, run=b"job"), "run"),
    (dict(step=0, rank=0, world_size=2, run="r" * 257), "run"),
]
