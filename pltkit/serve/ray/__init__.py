"""plt-serve on Ray Serve, for a team: replicas of the engine behind one ingress (`pip install
'pltkit[ray]'`; docs/scale.md). replica.py: the engine deployment, each replica running plt-serve's
own application; router.py: prefix-affinity routing (pltkit.serve.affinity); ingress.py: the HTTP
front (Host, Origin, API key, request limits), forwarding to the replicas; app.py: the application."""
