"""The whole system on one machine: Redis, model servers, and Usher in either shape — the
trio (Pool, Scheduler, Notifier and optionally the HTTP gateway, each its own process) or
all-in-one (``usher serve``: the four in one process). Used by ``make up`` (``usher up``),
the end-to-end tests and the benchmarks."""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from usher.emulator import EmulatorProcess
from usher.testing.processes import ServiceProcess, free_port
from usher.testing.redis_server import RedisServer
from usher.testing.redis_topologies import LocalRedisCluster, LocalSentinel

__all__ = ["DEFAULT_TOKENS", "LocalStack", "StackConfig", "quick_fleet"]

#: Demo callers: three tenants, an operator, and the identity services use with each other.
DEFAULT_TOKENS = (
    "alice-token=alice@acme,bob-token=bob@acme,carol-token=carol@globex,"
    "admin-token=ops@usher:admin,service-token=scheduler@usher:service"
)
SERVICE_TOKEN = "service-token"


def quick_fleet(tokens_per_second: int, output_tokens: str = "20:40") -> tuple[str, ...]:
    """Emulator arguments of the usual test fleet: two instances running two requests of a
    model at once, loads in 50 ms, answers of ``output_tokens`` (a range) at this speed."""
    return (
        *("--fleet", "2", "--parallel", "2", "--load-time", "0.05"),
        *("--tokens-per-second", str(tokens_per_second), "--output-tokens", output_tokens),
    )


@dataclass
class StackConfig:
    state_dir: str = ""
    #: Use this Redis instead of starting one.
    redis_url: str = ""
    redis_appendfsync: str = "everysec"
    #: Without redis_url: "standalone" (one redis-server), "cluster" (3 primaries + 3
    #: replicas) or "sentinel" (a primary, a replica, 3 sentinels), all on loopback.
    redis_topology: str = "standalone"
    #: Real model servers (Ollama URLs); empty = start an emulated fleet.
    ollama_urls: Sequence[str] = ()
    emulator_args: Sequence[str] = ("--fleet", "2", "--tokens-per-second", "60", "--parallel", "2")
    #: Options added to every instance of USHER_INSTANCES; slots must match the servers'.
    instance_options: str = ";parallel=2"
    #: Also register the first model server's OpenAI-compatible API as the external provider.
    external_provider: bool = False
    #: Run this many model servers, each its own process (killable one by one); 0 = one
    #: process with the fleet of emulator_args.
    model_server_processes: int = 0
    #: Different model servers, each its own process: (emulator args, instance options).
    #: Overrides emulator_args / instance_options / model_server_processes when set.
    model_servers: Sequence[tuple[Sequence[str], str]] = ()
    #: Serve /metrics from each service on a free port (see LocalStack.metrics_urls).
    metrics: bool = False
    tokens: str = DEFAULT_TOKENS
    scheduler_env: Mapping[str, str] = field(default_factory=dict)
    pool_env: Mapping[str, str] = field(default_factory=dict)
    notifier_env: Mapping[str, str] = field(default_factory=dict)
    log_level: str = "warning"
    scheduler_replicas: int = 1
    notifier_replicas: int = 1
    #: Pools beside the first; each Scheduler and Notifier (and the gateways) are given every
    #: replica's address and spread their calls round robin.
    pool_replicas: int = 1
    #: Gateways (with ``gateway``), each on its own port, clients of every replica.
    gateway_replicas: int = 1
    #: Also start the HTTP gateway (services.gateway) in front of the services.
    gateway: bool = False
    #: The Pool's fleet as a ``USHER_INSTANCES`` line or a ``USHER_POOL_CONFIG`` file; either
    #: one replaces the emulated fleet and ``ollama_urls``.
    instances: str = ""
    pool_config: str = ""
    #: Ports by service ("pool", "scheduler-0", "notifier-0", "gateway"); others are free
    #: ports picked at start.
    ports: Mapping[str, int] = field(default_factory=dict)
    #: The gateway's listen host (its clients connect to loopback when it is a wildcard).
    gateway_host: str = "127.0.0.1"
    service_token: str = SERVICE_TOKEN
    gateway_admin_token: str = "admin-token"
    #: Settings every service and the gateway get (e.g. USHER_AUTH_OPEN).
    common_env: Mapping[str, str] = field(default_factory=dict)
    #: One ``usher serve`` process (with its gateway) instead of the trio's processes;
    #: ``pool``, ``schedulers[0]``, ``notifiers[0]`` and ``gateway`` all name it (each with
    #: its own port). Replicas, per-service metrics and restarting one service need the trio.
    all_in_one: bool = False
    #: Settings the gateway gets besides the common ones (in either shape).
    gateway_env: Mapping[str, str] = field(default_factory=dict)
    #: A tree of Usher's source the services run from (another version, for a benchmark's
    #: anchor); None: this one. The model servers and Redis are this tree's either way.
    source_dir: str | None = None


class LocalStack:
    def __init__(self, config: StackConfig | None = None) -> None:
        self.config = config or StackConfig()
        self.state_dir = Path(self.config.state_dir or tempfile.mkdtemp(prefix="usher-stack-"))
        self.redis: RedisServer | None = None
        #: The Cluster or Sentinel setup started for redis_topology.
        self.redis_topology: LocalRedisCluster | LocalSentinel | None = None
        self.emulators: EmulatorProcess | None = None
        self.model_servers: list[EmulatorProcess] = []
        self.model_urls: list[str] = list(self.config.ollama_urls)
        self.redis_url = self.config.redis_url
        self.pools: list[ServiceProcess] = []
        self.schedulers: list[ServiceProcess] = []
        self.notifiers: list[ServiceProcess] = []
        #: service name ("pool", "scheduler-0", "notifier-0") → its /metrics URL.
        self.metrics_urls: dict[str, str] = {}
        self.gateways: list[ServiceProcess] = []
        #: The ``usher serve`` process (all_in_one).
        self.serve: ServiceProcess | None = None

    def _common(self) -> dict[str, str]:
        return {
            "USHER_REDIS_URL": self.redis_url,
            "USHER_API_TOKENS": self.config.tokens,
            "USHER_SERVICE_TOKEN": self.config.service_token,
            "USHER_LOG_LEVEL": self.config.log_level,
            "USHER_SHUTDOWN_GRACE_SECONDS": "2",
            **self.config.common_env,
        }

    def _port(self, name: str, running: ServiceProcess | None) -> int:
        """The port a (re)started service listens on: its old one, the configured one, or
        a free one."""
        if running is not None:
            return running.port
        return self.config.ports.get(name) or free_port()

    def _metrics_env(self, name: str) -> dict[str, str]:
        if not self.config.metrics:
            return {}
        if name not in self.metrics_urls:
            self.metrics_urls[name] = f"http://127.0.0.1:{free_port()}/metrics"
        port = self.metrics_urls[name].rsplit(":", 1)[1].split("/")[0]
        return {"USHER_METRICS_PORT": port}

    def _log(self, name: str) -> str:
        return str(self.state_dir / f"{name}.log")

    @property
    def pool(self) -> ServiceProcess | None:
        """The first Pool."""
        return self.pools[0] if self.pools else None

    @property
    def gateway(self) -> ServiceProcess | None:
        """The first gateway."""
        return self.gateways[0] if self.gateways else None

    @property
    def pool_address(self) -> str:
        assert self.pool is not None
        return f"127.0.0.1:{self.pool.port}"

    @property
    def pool_addresses(self) -> str:
        """Every Pool replica, as the comma list a channel balances over."""
        return ",".join(f"127.0.0.1:{p.port}" for p in self.pools)

    @property
    def scheduler_addresses(self) -> str:
        return ",".join(f"127.0.0.1:{p.port}" for p in self.schedulers)

    @property
    def notifier_addresses(self) -> str:
        return ",".join(f"127.0.0.1:{p.port}" for p in self.notifiers)

    @property
    def scheduler_address(self) -> str:
        return f"127.0.0.1:{self.schedulers[0].port}"

    @property
    def notifier_address(self) -> str:
        return f"127.0.0.1:{self.notifiers[0].port}"

    @property
    def gateway_address(self) -> str:
        assert self.gateway is not None
        return self._gateway_address(self.gateway)

    def _gateway_address(self, gateway: ServiceProcess) -> str:
        host = self.config.gateway_host
        if host in ("", "0.0.0.0", "::"):
            host = "127.0.0.1"
        return f"[{host}]:{gateway.port}" if ":" in host else f"{host}:{gateway.port}"

    @property
    def gateway_url(self) -> str:
        return f"http://{self.gateway_address}"

    @property
    def gateway_urls(self) -> list[str]:
        return [f"http://{self._gateway_address(g)}" for g in self.gateways]

    def start_model_servers(self) -> None:
        if self.model_urls or self.config.instances or self.config.pool_config:
            return
        if self.config.model_servers:
            for args, _options in self.config.model_servers:
                port = free_port()
                self.model_servers.append(EmulatorProcess([*args, "--port", str(port)]))
                self.model_urls += self.model_servers[-1].start()
            return
        if self.config.model_server_processes:
            # One emulated server per process on a fixed port, so each can be killed and
            # brought back at the same address.
            args = list(self.config.emulator_args)
            if "--fleet" in args:
                at = args.index("--fleet")
                del args[at : at + 2]
            for _ in range(self.config.model_server_processes):
                port = free_port()
                self.model_servers.append(EmulatorProcess([*args, "--port", str(port)]))
                self.model_urls += self.model_servers[-1].start()
            return
        self.emulators = EmulatorProcess(list(self.config.emulator_args))
        self.model_urls = self.emulators.start()

    def restart_model_server(self, index: int) -> None:
        """Bring back a killed model server (model_server_processes mode) on its port."""
        self.model_servers[index].stop()  # reaps it and closes its output pipe
        self.model_servers[index] = EmulatorProcess(self.model_servers[index].args)
        self.model_servers[index].start()

    def _fleet_env(self) -> dict[str, str]:
        """The Pool's instances; set explicitly so a caller's own USHER_INSTANCES,
        USHER_POOL_CONFIG or OLLAMA_HOST can't leak in beside them."""
        if self.config.instances or self.config.pool_config:
            return {
                "USHER_INSTANCES": self.config.instances,
                "USHER_POOL_CONFIG": self.config.pool_config,
                "OLLAMA_HOST": "",
            }
        options = (
            [opts for _args, opts in self.config.model_servers]
            if self.config.model_servers
            else [self.config.instance_options] * len(self.model_urls)
        )
        instances = ",".join(
            f"ollama-{i}={url}{opts}"
            for i, (url, opts) in enumerate(zip(self.model_urls, options, strict=True))
        )
        if self.config.external_provider:
            instances += f",external={self.model_urls[0]};kind=openai;external=true;parallel=4"
        return {"USHER_INSTANCES": instances, "USHER_POOL_CONFIG": "", "OLLAMA_HOST": ""}

    def start_pool(self, index: int = 0) -> ServiceProcess:
        name = "pool" if index == 0 else f"pool-{index}"
        running = self.pools[index] if index < len(self.pools) else None
        port = self._port(name, running)
        process = ServiceProcess(
            "services.pool",
            port,
            {
                **self._common(),
                "USHER_POOL_LISTEN": f"127.0.0.1:{port}",
                **self._fleet_env(),
                **self._metrics_env(name),
                **self.config.pool_env,
            },
            log_path=self._log(name),
            cwd=self.config.source_dir,
        ).start()
        if running is not None:
            self.pools[index] = process
        else:
            self.pools.append(process)
        return process

    def start_scheduler(self, index: int = 0) -> ServiceProcess:
        return self._launch_scheduler(index).ready()

    def _launch_scheduler(self, index: int) -> ServiceProcess:
        running = self.schedulers[index] if index < len(self.schedulers) else None
        port = self._port(f"scheduler-{index}", running)
        process = ServiceProcess(
            "services.scheduler",
            port,
            {
                **self._common(),
                "USHER_SCHEDULER_LISTEN": f"127.0.0.1:{port}",
                "USHER_POOL_ADDRESS": self.pool_addresses,
                "USHER_DEFAULT_PARALLEL": "2",
                **self._metrics_env(f"scheduler-{index}"),
                **self.config.scheduler_env,
            },
            log_path=self._log(f"scheduler-{index}"),
            cwd=self.config.source_dir,
        ).launch()
        if index < len(self.schedulers):
            self.schedulers[index] = process
        else:
            self.schedulers.append(process)
        return process

    def start_notifier(self, index: int = 0) -> ServiceProcess:
        return self._launch_notifier(index).ready()

    def _launch_notifier(self, index: int) -> ServiceProcess:
        running = self.notifiers[index] if index < len(self.notifiers) else None
        port = self._port(f"notifier-{index}", running)
        process = ServiceProcess(
            "services.notifier",
            port,
            {
                **self._common(),
                "USHER_NOTIFIER_LISTEN": f"127.0.0.1:{port}",
                "USHER_POOL_ADDRESS": self.pool_addresses,
                **self._metrics_env(f"notifier-{index}"),
                **self.config.notifier_env,
            },
            log_path=self._log(f"notifier-{index}"),
            cwd=self.config.source_dir,
        ).launch()
        if index < len(self.notifiers):
            self.notifiers[index] = process
        else:
            self.notifiers.append(process)
        return process

    def start_gateway(self, env: Mapping[str, str] | None = None, index: int = 0) -> ServiceProcess:
        """An HTTP gateway, a client of every Scheduler, Notifier and Pool (round robin);
        ``env`` adds or overrides settings (e.g. USHER_GATEWAY_DEFAULT_TOKEN)."""
        return self._launch_gateway(env, index).ready()

    def _launch_gateway(
        self, env: Mapping[str, str] | None = None, index: int = 0
    ) -> ServiceProcess:
        name = "gateway" if index == 0 else f"gateway-{index}"
        running = self.gateways[index] if index < len(self.gateways) else None
        port = self._port(name, running)
        host = self.config.gateway_host
        process = ServiceProcess(
            "services.gateway",
            port,
            {
                **self._common(),
                "USHER_GATEWAY_LISTEN": f"[{host}]:{port}" if ":" in host else f"{host}:{port}",
                "USHER_SCHEDULER_ADDRESS": self.scheduler_addresses,
                "USHER_NOTIFIER_ADDRESS": self.notifier_addresses,
                "USHER_POOL_ADDRESS": self.pool_addresses,
                "USHER_GATEWAY_ADMIN_TOKEN": self.config.gateway_admin_token,
                **self.config.gateway_env,
                **(env or {}),
            },
            log_path=self._log(name),
            cwd=self.config.source_dir,
        ).launch()
        if running is not None:
            self.gateways[index] = process
        else:
            self.gateways.append(process)
        return process

    def _gateway_listen(self, port: int) -> str:
        host = self.config.gateway_host
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def start_serve(self) -> ServiceProcess:
        """Usher all-in-one: one process listening on the four services' ports."""
        ports = {name: self._port(name, None) for name in ("pool", "scheduler-0", "notifier-0")}
        gateway_port = self._port("gateway", None)
        env = {
            **self._common(),
            "USHER_POOL_LISTEN": f"127.0.0.1:{ports['pool']}",
            "USHER_SCHEDULER_LISTEN": f"127.0.0.1:{ports['scheduler-0']}",
            "USHER_NOTIFIER_LISTEN": f"127.0.0.1:{ports['notifier-0']}",
            "USHER_GATEWAY_LISTEN": self._gateway_listen(gateway_port),
            "USHER_DEFAULT_PARALLEL": "2",
            "USHER_GATEWAY_ADMIN_TOKEN": self.config.gateway_admin_token,
            **self._fleet_env(),
            **self._metrics_env("serve"),
            **self.config.pool_env,
            **self.config.scheduler_env,
            **self.config.notifier_env,
            **self.config.gateway_env,
        }
        if "serve" in self.metrics_urls:  # one registry serves every service's metrics
            for name in ports:
                self.metrics_urls[name] = self.metrics_urls["serve"]
        self.serve = ServiceProcess(
            "clients.serve",
            gateway_port,
            env,
            log_path=self._log("serve"),
            cwd=self.config.source_dir,
        ).start()
        self.pools = [self._same_process(ports["pool"])]
        self.schedulers = [self._same_process(ports["scheduler-0"])]
        self.notifiers = [self._same_process(ports["notifier-0"])]
        self.gateways = [self._same_process(gateway_port)]
        for process in (self.pools[0], self.schedulers[0], self.notifiers[0]):
            process.ready()
        return self.serve

    def _same_process(self, port: int) -> ServiceProcess:
        """The serve process seen as one service listening on ``port``."""
        assert self.serve is not None
        alias = ServiceProcess(self.serve.module, port, {}, log_path=self.serve.log_path)
        alias.process = self.serve.process
        return alias

    def start(self) -> LocalStack:
        """Start everything; a failure (or Ctrl-C) part way stops what had started."""
        try:
            return self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> LocalStack:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        if not self.redis_url:
            self._start_redis()
        self.start_model_servers()
        if self.config.all_in_one:
            self.start_serve()
            return self
        for index in range(self.config.pool_replicas):
            self.start_pool(index)
        # The services dial each other lazily, so they start side by side (Python's start-up
        # is most of each one's second).
        launched = [self._launch_scheduler(i) for i in range(self.config.scheduler_replicas)]
        launched += [self._launch_notifier(i) for i in range(self.config.notifier_replicas)]
        if self.config.gateway:
            launched += [self._launch_gateway(None, i) for i in range(self.config.gateway_replicas)]
        for process in launched:
            process.ready()
        return self

    def _start_redis(self) -> None:
        fsync = self.config.redis_appendfsync
        if self.config.redis_topology == "cluster":
            self.redis_topology = LocalRedisCluster(appendfsync=fsync).start()
            self.redis_url = self.redis_topology.url
        elif self.config.redis_topology == "sentinel":
            self.redis_topology = LocalSentinel(appendfsync=fsync).start()
            self.redis_url = self.redis_topology.url
        elif self.config.redis_topology == "standalone":
            self.redis = RedisServer(
                data_dir=str(self.state_dir / "redis"), appendfsync=fsync
            ).start()
            self.redis_url = self.redis.url
        else:
            raise ValueError(
                f"redis_topology {self.config.redis_topology!r} is not one of "
                "standalone, cluster, sentinel"
            )

    def stop(self) -> None:
        # SIGTERM to every service at once, then wait: each drains for its grace period
        # side by side instead of one after another.
        services = [*self.gateways, *self.notifiers, *self.schedulers, *self.pools]
        if self.serve is not None:
            # The four aliases of the one process stop with it; a replica a test started
            # beside it (a second Notifier, say) stops as in the trio: it used to outlive
            # the suite.
            alone = self.serve.process
            services = [self.serve, *(p for p in services if p.process is not alone)]
        for process in services:
            process.signal_stop()
        for process in services:
            process.terminate(timeout=5)
        if self.emulators is not None:
            self.emulators.terminate()
        for server in self.model_servers:
            server.terminate()
        if self.redis is not None:
            self.redis.stop()
        if self.redis_topology is not None:
            self.redis_topology.stop()

    def __enter__(self) -> LocalStack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
