"""The team server as a Ray Serve application: an ingress (one replica by default) in front of
`replicas` engine replicas, the engine's requests routed by prefix affinity.

    plt-serve --ray --port 8012 --replicas 2 --threads 1          # a local Ray cluster, or --ray-address
    serve run pltkit.serve.ray.app:app_builder model=default replicas=2 threads=1

Autoscaling, placement and the rest are Ray's own: a Serve config file can override any
deployment option ("Engine", "Ingress"); see docs/scale.md.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields, replace

from ray import serve
from ray.serve.config import RequestRouterConfig

from pltkit.serve.access import LOOPBACK_HOSTS, Access
from pltkit.serve.ray.ingress import Front, create_ingress_app
from pltkit.serve.ray.replica import EngineReplica
from pltkit.serve.ray.router import PrefixAffinityRouter
from pltkit.serve.server import Limits, Server

ROUTERS = {"affinity": lambda o: RequestRouterConfig(request_router_class=PrefixAffinityRouter, request_router_kwargs={
               "imbalance": o.imbalance, "min_match": o.min_match}),
           "pow2": lambda o: RequestRouterConfig()}  # Ray's default: the less loaded of two random replicas


@dataclass(frozen=True)
class TeamOptions:
    model: str = "default"
    replicas: int = 2
    threads: int = 1  # decode threads per replica (and the CPUs Ray reserves for it)
    gpus: float = 0.0  # GPUs per replica
    backend: str | None = None
    cache_mb: int = 256  # per replica
    verify: bool = True
    router: str = "affinity"  # or "pow2": Ray's default, for comparison
    imbalance: int = 2  # see pltkit.serve.affinity
    min_match: float = 0.1
    api_key: str | None = None
    hosts: tuple[str, ...] = LOOPBACK_HOSTS
    origins: tuple[str, ...] = ()
    limits: Limits = Limits()
    setup: Callable[[Server], None] | None = None  # called in each replica with its Server once loaded


class Ingress:
    def __init__(self, engine, access: Access, api_key: str | None, limits: Limits):
        self.engine, self.front = engine, Front(access, api_key, limits)

    def __serve_build_asgi_app__(self):
        return create_ingress_app(self.engine, self.front)


def build(o: TeamOptions):
    """The application: bind it with serve.run (or let `serve run` build it through app_builder)."""
    if o.router not in ROUTERS:
        raise ValueError(f"router must be one of {sorted(ROUTERS)}, got {o.router!r}")
    engine = serve.deployment(EngineReplica, name="Engine").options(
        num_replicas=o.replicas, ray_actor_options={"num_cpus": o.threads, "num_gpus": o.gpus},
        max_ongoing_requests=o.limits.max_queue + 8,  # queued jobs, the running one, and info requests
        max_queued_requests=o.limits.max_queue * o.replicas,  # then 503, as plt-serve's full queue
        max_constructor_retry_count=2,  # a model that fails to load fails the deployment soon
        request_router_config=ROUTERS[o.router](o), health_check_period_s=5)
    ingress = serve.deployment(serve.ingress()(Ingress), name="Ingress").options(
        ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1024)
    engine = engine.bind(o.model, o.backend, o.threads, o.cache_mb, o.verify, o.limits, o.setup)
    return ingress.bind(engine, Access(o.hosts, o.origins), o.api_key, o.limits)


def _names(v) -> tuple[str, ...]:
    return tuple(x.strip().lower() for x in (v.split(",") if isinstance(v, str) else v) if x.strip())


def _flag(v) -> bool:
    return v if isinstance(v, bool) else str(v).lower() in ("1", "true", "yes")


def _optional(v) -> str | None:
    return None if v in (None, "", "none", "None") else str(v)


ARGS = {"model": str, "replicas": int, "threads": int, "gpus": float, "backend": _optional, "cache_mb": int,
        "verify": _flag, "router": str, "imbalance": int, "min_match": float, "api_key": _optional,
        "hosts": _names, "origins": _names}  # besides Limits' fields, each read as its type
LIMIT_ARGS = {f.name: type(f.default) for f in fields(Limits)}


def app_builder(args: dict):
    """For `serve run pltkit.serve.ray.app:app_builder key=value ...` and Serve config files: the
    fields of TeamOptions and Limits (hosts and origins: lists, or comma-separated; hosts are
    added to the loopback ones)."""
    unknown = sorted(set(args) - set(ARGS) - set(LIMIT_ARGS))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown}; known: {sorted({*ARGS, *LIMIT_ARGS})}")
    options = {k: ARGS[k](v) for k, v in args.items() if k in ARGS}
    options["hosts"] = (*LOOPBACK_HOSTS, *options.get("hosts", ()))
    limits = replace(Limits(), **{k: LIMIT_ARGS[k](v) for k, v in args.items() if k in LIMIT_ARGS})
    return build(TeamOptions(**options, limits=limits))
