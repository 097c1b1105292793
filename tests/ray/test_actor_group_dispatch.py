"""The `balanced` dispatch mode on real Ray: results keep item order, each is handed on as it arrives,
and a slow rank gets fewer items."""

from orchestrator.runtime.actor_group import ActorGroup
from orchestrator.runtime.resources import WorkerResources


def test_balanced_dispatch_keeps_order_and_favours_the_free_rank(ray_local):
    class Worker:  # a stand-in role: rank 0 is 5x slower per item than rank 1
        def __init__(self, rank, world_size):
            self.rank = rank

        def work(self, item, scale):
            import time

            time.sleep(0.01 * (5 if self.rank == 0 else 1))
            return (item * scale, self.rank)

    group = ActorGroup("toy", Worker, 2, WorkerResources(0.5, 0.0))
    try:
        arrived = []  # on_result: each item as it finishes (what scoring during generation hangs on)
        out = group.balanced(Worker.work, list(range(30)), 2, on_result=lambda i, r: arrived.append((i, r)))
        assert [value for value, _ in out] == [2 * i for i in range(30)]
        assert sorted(arrived) == list(enumerate(out)) and arrived != sorted(arrived)  # arrival order, not item order
        served_by_slow = sum(1 for _, rank in out if rank == 0)
        assert 1 <= served_by_slow <= 10, served_by_slow  # an even split would give 15
    finally:
        group.shutdown()


class Probe:  # a stand-in role that reports where Ray placed it
    def __init__(self, rank, world_size):
        self.rank = rank

    def where(self):
        import ray

        return ray.get_runtime_context().get_placement_group_id(), self.rank


def test_colocated_roles_run_in_one_placement_group_and_free_it_with_the_last(ray_local):
    from orchestrator.runtime.placement import RolePlan, StagePlan, bundle_groups
    from orchestrator.runtime.placement_groups import StagePlacement

    roles = (RolePlan("a", 2, 0.25, 0.0), RolePlan("b", 2, 0.25, 0.0), RolePlan("c", 1, 0.5, 0.0))
    plan = StagePlan("s", "k", roles=roles, groups=bundle_groups(roles, (("a", "b"),), "PACK"),
                     phases=(("a", "b", "c"),))
    placement = StagePlacement(plan, timeout_s=30)
    groups = {r.role: ActorGroup(r.role, Probe, r.num_workers, WorkerResources(r.cpus_per_worker, 0.0),
                                 placement=placement.acquire(r.role)) for r in roles}
    try:
        where = {role: g.broadcast(Probe.where) for role, g in groups.items()}
        assert {pg for pg, _ in where["a"]} == {pg for pg, _ in where["b"]}  # shared
        assert {pg for pg, _ in where["a"]} != {pg for pg, _ in where["c"]}
        # reserved: 2 shared bundles of 0.25 + 0.25 and one of 0.5 = 1.5 of the 2 CPUs
        assert ray_local.available_resources().get("CPU", 0.0) == 0.5
        groups["a"].shutdown()
        placement.release("a")
        assert len(placement._held) == 2  # b still holds the shared group
        groups["b"].shutdown()
        placement.release("b")
        assert len(placement._held) == 1
    finally:
        for g in groups.values():
            g.shutdown()
        placement.close()
    ray_local.get(ray_local.remote(lambda: 1).remote())  # the cluster is usable again


class Sleeper:  # a stand-in role whose call takes a given time
    def __init__(self, rank, world_size):
        self.rank = rank

    def nap(self, seconds):
        import time

        time.sleep(seconds)
        return seconds, self.rank


def test_wait_any_returns_the_calls_that_finished_and_concurrent_forwards_overlap(ray_local, tmp_path):
    """``wait_any`` reports a pending call once every rank answered; ``run_forwards`` sends every job
    before the driver's own work and records when each one's groups answered (overlapping spans), or
    runs them one by one without overlap."""
    from orchestrator.runtime.actor_group import wait_any
    from orchestrator.runtime.stage_log import StageLog
    from pipelines.stages.timeline import run_forwards

    slow, fast = (ActorGroup(name, Sleeper, 1, WorkerResources(0.25, 0.0)) for name in ("slow", "fast"))
    try:
        waiting = [slow.shard_async(Sleeper.nap, [1.0]), fast.shard_async(Sleeper.nap, [0.1])]
        assert wait_any(waiting, 5.0) == [1]
        assert wait_any(waiting[:1], 5.0) == [0]
        assert wait_any(waiting, 5.0) == [0, 1]
        assert [p.get() for p in waiting] == [[(1.0, 0)], [(0.1, 0)]]

        class Job:
            def __init__(self, group, seconds):
                self.pending = group.shard_async(Sleeper.nap, [seconds])

            def get(self):
                return self.pending.get()[0][0]

        log = StageLog(None)
        jobs = {"slow": lambda: Job(slow, 0.6), "fast": lambda: Job(fast, 0.2)}
        for overlap in (True, False):
            m: dict[str, float] = {}
            log.take_spans(0.0)
            results, mine = run_forwards(log, jobs, m, overlap=overlap, meanwhile=lambda: "scored", timeout_s=600)
            assert results == {"slow": 0.6, "fast": 0.2} and mine == "scored"
            spans = {phase: (start, end) for phase, start, end in log.spans()}
            if overlap:  # sent together: fast ends first, and both ran at once
                assert spans["fast"][1] < spans["slow"][1] and spans["slow"][0] < spans["fast"][1]
                assert m["timing/slow_s"] < 0.6 + 0.2
            else:  # one after another, in order
                assert spans["slow"][1] <= spans["fast"][0]
    finally:
        slow.shutdown()
        fast.shutdown()
