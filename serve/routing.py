"""Session affinity for the model deployments: every step of one session goes to the replica that holds its
KV cache, while that replica has room.

:class:`SessionRouter` is a Ray Serve request router (``request_router_config.request_router_class``,
``serve.routing:SessionRouter``). It ranks the replicas by rendezvous hashing of the call's ``session``
keyword — the first rank is the session's own replica, the second all others (Serve picks the least loaded
of a rank whose replicas accept the request). When replicas come or go only the sessions of the replica
that changed move; a moved session replays its prefix once on its new replica. Calls without a session
(readouts) go to the less loaded of two random replicas, as Serve's default router does.
"""

from __future__ import annotations

import hashlib
import random

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

ROUTER_PATH = "serve.routing:SessionRouter"


def session_of(request: PendingRequest | None) -> str | None:
    if request is None:
        return None
    session = request.kwargs.get("session")
    return session if isinstance(session, str) and session else None


def rendezvous(session: str, replica_ids: list[str]) -> list[str]:
    """``replica_ids`` ordered by their hash score for ``session`` (highest first)."""
    score = {r: hashlib.blake2b(f"{session}|{r}".encode(), digest_size=8).digest() for r in replica_ids}
    return sorted(replica_ids, key=lambda r: score[r], reverse=True)


class SessionRouter(RequestRouter):
    """Rank replicas for a session by rendezvous hashing (see the module docstring)."""

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        session = session_of(pending_request)
        if session is None:
            return [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        order = [by_id[r] for r in rendezvous(session, list(by_id))]
        return [order[:1], order[1:]] if len(order) > 1 else [order]


__all__ = ["ROUTER_PATH", "SessionRouter", "rendezvous", "session_of"]
