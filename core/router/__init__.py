"""kvyard router: a cache-aware HTTP load balancer in front of whole `kvyard serve` workers
(its own process, `kvyard router`). config.py (flags), radix_tree.py (approximate prefix tree),
policies.py (cache_aware, round_robin, random, power_of_two, shortest_queue), workers.py (health),
routing_text.py, metrics.py, app.py (the proxy). It imports no torch."""
