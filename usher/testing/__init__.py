"""Test helpers shipped with Usher: a real Redis on a free port, free ports, processes."""

from usher.testing.processes import ServiceProcess, free_port
from usher.testing.redis_server import RedisServer, redis_server_binary

__all__ = ["RedisServer", "ServiceProcess", "free_port", "redis_server_binary"]
