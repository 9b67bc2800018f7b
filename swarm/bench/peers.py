"""What the peers measured on the benchmark's machine, printed beside swarm's figures.

Same 2-core machine, 2 workers, the same workloads written for each peer:
W1, W2, W3 in tasks/s, W4 in ms, CPU in ms per task.
"""

from __future__ import annotations

PEERS: dict[str, tuple[int, int, int, float, float]] = {
    "Dask": (1582, 1041, 710, 10.6, 0.94),
    "Ray": (1484, 1520, 938, 1.98, 1.15),
    "Celery": (581, 477, 427, 2.98, 2.80),
}
