"""`[core] hostname_callable` for the Celery topology test: the service's name, as a container's hostname.

Every "container" of tests/test_celery_topology.py runs on this one machine, so socket.getfqdn()
would be the same for all of them; each gets HOSTNAME=<service> instead, as compose gives it.
"""

from __future__ import annotations

import os
import socket


def hostname() -> str:
    return os.environ.get("HOSTNAME") or socket.getfqdn()
