"""The engine deployment's request router (Ray Serve's RequestRouter API): prefix affinity, with
the policy and its thresholds in pltkit.serve.affinity.

It runs where the requests are sent from (the ingress replica, on Ray's router thread), and
learns from the requests it routes: the prompt key of each (the `prompt` argument of
EngineReplica.asgi) is recorded against the replica it went to. Loads are Ray's own counts of each
replica's requests in flight. A request naming a replica (the `replica` argument: the ingress's
X-Pltkit-Replica request header) goes to it while it lives, so that an operator can read one
replica's /metrics.
"""

from __future__ import annotations

import random

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter

from pltkit.serve.affinity import PrefixIndex, ranked


class PrefixAffinityRouter(RequestRouter):
    def initialize_state(self, imbalance: int = 2, min_match: float = 0.1, max_blocks: int = 200_000):
        """imbalance: how many more requests in flight than the least-loaded replica the preferred
        replica may have; min_match: the share of the prompt its cached prefix must cover."""
        self.imbalance, self.min_match = imbalance, min_match
        self.index = PrefixIndex(max_blocks)

    async def choose_replicas(self, candidate_replicas, pending_request: PendingRequest | None = None):
        if pending_request is not None:  # when every replica ranked is full, Ray waits before asking again
            pending_request.routing_context.should_backoff = True
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        kwargs = pending_request.kwargs if pending_request is not None else {}
        if kwargs.get("replica") in by_id:
            return [[by_id[kwargs["replica"]]]]
        loads = {i: self.replica_queue_len_cache.get(r.replica_id) for i, r in by_id.items()}
        ranks = ranked(kwargs.get("prompt"), list(by_id), loads, self.index, self.imbalance, self.min_match)
        # within a rank, Ray takes the least loaded it finds and ties go to the first: shuffled, they spread
        return [random.sample([by_id[i] for i in rank], len(rank)) for rank in ranks]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        if (prompt := pending_request.kwargs.get("prompt")) is not None:
            self.index.record(prompt, replica_id.unique_id)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self.index.forget(replica_id.unique_id)
