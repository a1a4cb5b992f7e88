"""plt-serve --ray: the team server on Ray Serve (pltkit.serve.ray; docs/scale.md). Connects to
the Ray cluster at --ray-address, or starts one on this machine, deploys the application, and
serves until Ctrl-C or SIGTERM, then takes it down (on a cluster of its own, Serve and Ray too).
Where Serve already runs on the cluster, its HTTP host and port stay as they are (Ray's rule)."""

from __future__ import annotations

import argparse
import sys
import threading

from pltkit.cli import args as types


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("team server on Ray Serve (pip install 'pltkit[ray]')")
    g.add_argument("--ray", action="store_true", help="serve replicas of the engine on Ray Serve, behind one ingress "
                                                      "on --host/--port (TCP only)")
    g.add_argument("--replicas", type=types.positive_int, default=2, help="engine replicas (with --ray)")
    g.add_argument("--gpus-per-replica", type=types.nonneg_float, default=0.0, help="GPUs Ray gives each replica")
    g.add_argument("--ray-address", help="a running Ray cluster (e.g. 'auto' or ray://HOST:10001); "
                                         "default: start one on this machine")
    g.add_argument("--router", choices=["affinity", "pow2"], default="affinity",
                   help="affinity: each editor's requests go to the replica holding its prefix; pow2: Ray's default")


def check(p: argparse.ArgumentParser, args) -> None:
    if args.ray and (args.port is None or args.socket is not None):
        p.error("--ray serves over TCP only: give --port (and no --socket)")


def run(args, limits, access) -> int:
    try:
        import ray
        from ray import serve
    except ImportError:
        print("plt-serve: --ray needs Ray Serve: pip install 'pltkit[ray]'", file=sys.stderr)
        return 2
    from pltkit.serve.listen import exit_on_signals
    from pltkit.serve.ray.app import TeamOptions, build

    options = TeamOptions(model=args.model, replicas=args.replicas, threads=args.threads or 1,
                          gpus=args.gpus_per_replica, backend=args.backend, cache_mb=args.cache_mb,
                          verify=not args.no_verify, router=args.router, api_key=args.api_key, hosts=access.hosts,
                          origins=access.origins, limits=limits)
    ray.init(address=args.ray_address, include_dashboard=False, logging_level="warning")
    exit_on_signals()  # again: Ray's own handlers replaced them
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        print(f"plt-serve: deploying {args.replicas} replica(s) of {args.model} on Ray Serve", file=sys.stderr,
              flush=True)
        serve.run(build(options), name="pltkit", route_prefix="/")
        print(f"plt-serve: ready on http://{args.host}:{args.port} ({args.replicas} replicas, "
              f"{options.threads} threads each, router {args.router})", file=sys.stderr, flush=True)
        threading.Event().wait()  # until a signal exits (exit_on_signals)
    finally:
        if args.ray_address:  # a shared cluster: only this application goes
            serve.delete("pltkit")
        else:
            serve.shutdown()
        ray.shutdown()
    return 0
