"""The whole system on one machine, each part its own process: Redis, model servers, Pool,
Scheduler and Notifier. Used by ``make up``, the end-to-end tests and the benchmarks."""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from usher.emulator import EmulatorProcess
from usher.testing.processes import ServiceProcess, free_port
from usher.testing.redis_server import RedisServer

__all__ = ["DEFAULT_TOKENS", "LocalStack", "StackConfig"]

#: Demo callers: three tenants, an operator, and the identity services use with each other.
DEFAULT_TOKENS = (
    "alice-token=alice@acme,bob-token=bob@acme,carol-token=carol@globex,"
    "admin-token=ops@usher:admin,service-token=scheduler@usher:service"
)
SERVICE_TOKEN = "service-token"


@dataclass
class StackConfig:
    state_dir: str = ""
    #: Use this Redis instead of starting one.
    redis_url: str = ""
    redis_appendfsync: str = "everysec"
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
    #: Also start the HTTP gateway (services.gateway) in front of the services.
    gateway: bool = False


class LocalStack:
    def __init__(self, config: StackConfig | None = None) -> None:
        self.config = config or StackConfig()
        self.state_dir = Path(self.config.state_dir or tempfile.mkdtemp(prefix="usher-stack-"))
        self.redis: RedisServer | None = None
        self.emulators: EmulatorProcess | None = None
        self.model_servers: list[EmulatorProcess] = []
        self.model_urls: list[str] = list(self.config.ollama_urls)
        self.redis_url = self.config.redis_url
        self.pool: ServiceProcess | None = None
        self.schedulers: list[ServiceProcess] = []
        self.notifiers: list[ServiceProcess] = []
        #: service name ("pool", "scheduler-0", "notifier-0") → its /metrics URL.
        self.metrics_urls: dict[str, str] = {}
        self.gateway: ServiceProcess | None = None

    def _common(self) -> dict[str, str]:
        return {
            "USHER_REDIS_URL": self.redis_url,
            "USHER_API_TOKENS": self.config.tokens,
            "USHER_SERVICE_TOKEN": SERVICE_TOKEN,
            "USHER_LOG_LEVEL": self.config.log_level,
            "USHER_SHUTDOWN_GRACE_SECONDS": "2",
        }

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
    def pool_address(self) -> str:
        assert self.pool is not None
        return f"127.0.0.1:{self.pool.port}"

    @property
    def scheduler_address(self) -> str:
        return f"127.0.0.1:{self.schedulers[0].port}"

    @property
    def notifier_address(self) -> str:
        return f"127.0.0.1:{self.notifiers[0].port}"

    @property
    def gateway_address(self) -> str:
        assert self.gateway is not None
        return f"127.0.0.1:{self.gateway.port}"

    @property
    def gateway_url(self) -> str:
        return f"http://{self.gateway_address}"

    def start_model_servers(self) -> None:
        if self.model_urls:
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

    def start_pool(self) -> ServiceProcess:
        port = self.pool.port if self.pool is not None else free_port()
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
        self.pool = ServiceProcess(
            "services.pool",
            port,
            {
                **self._common(),
                "USHER_POOL_LISTEN": f"127.0.0.1:{port}",
                "USHER_INSTANCES": instances,
                **self._metrics_env("pool"),
                **self.config.pool_env,
            },
            log_path=self._log("pool"),
        ).start()
        return self.pool

    def start_scheduler(self, index: int = 0) -> ServiceProcess:
        port = self.schedulers[index].port if index < len(self.schedulers) else free_port()
        process = ServiceProcess(
            "services.scheduler",
            port,
            {
                **self._common(),
                "USHER_SCHEDULER_LISTEN": f"127.0.0.1:{port}",
                "USHER_POOL_ADDRESS": self.pool_address,
                "USHER_DEFAULT_PARALLEL": "2",
                **self._metrics_env(f"scheduler-{index}"),
                **self.config.scheduler_env,
            },
            log_path=self._log(f"scheduler-{index}"),
        ).start()
        if index < len(self.schedulers):
            self.schedulers[index] = process
        else:
            self.schedulers.append(process)
        return process

    def start_notifier(self, index: int = 0) -> ServiceProcess:
        port = self.notifiers[index].port if index < len(self.notifiers) else free_port()
        process = ServiceProcess(
            "services.notifier",
            port,
            {
                **self._common(),
                "USHER_NOTIFIER_LISTEN": f"127.0.0.1:{port}",
                "USHER_POOL_ADDRESS": self.pool_address,
                **self._metrics_env(f"notifier-{index}"),
                **self.config.notifier_env,
            },
            log_path=self._log(f"notifier-{index}"),
        ).start()
        if index < len(self.notifiers):
            self.notifiers[index] = process
        else:
            self.notifiers.append(process)
        return process

    def start_gateway(self, env: Mapping[str, str] | None = None) -> ServiceProcess:
        """The HTTP gateway, a client of the first Scheduler and Notifier and of the Pool;
        ``env`` adds or overrides settings (e.g. USHER_GATEWAY_DEFAULT_TOKEN)."""
        port = self.gateway.port if self.gateway is not None else free_port()
        self.gateway = ServiceProcess(
            "services.gateway",
            port,
            {
                **self._common(),
                "USHER_GATEWAY_LISTEN": f"127.0.0.1:{port}",
                "USHER_SCHEDULER_ADDRESS": self.scheduler_address,
                "USHER_NOTIFIER_ADDRESS": self.notifier_address,
                "USHER_POOL_ADDRESS": self.pool_address,
                "USHER_GATEWAY_ADMIN_TOKEN": "admin-token",
                **(env or {}),
            },
            log_path=self._log("gateway"),
        ).start()
        return self.gateway

    def start(self) -> LocalStack:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        if not self.redis_url:
            self.redis = RedisServer(
                data_dir=str(self.state_dir / "redis"), appendfsync=self.config.redis_appendfsync
            ).start()
            self.redis_url = self.redis.url
        self.start_model_servers()
        self.start_pool()
        for i in range(self.config.scheduler_replicas):
            self.start_scheduler(i)
        for i in range(self.config.notifier_replicas):
            self.start_notifier(i)
        if self.config.gateway:
            self.start_gateway()
        return self

    def stop(self) -> None:
        if self.gateway is not None:
            self.gateway.terminate(timeout=5)
        for process in [*self.notifiers, *self.schedulers]:
            process.terminate(timeout=5)
        if self.pool is not None:
            self.pool.terminate(timeout=5)
        if self.emulators is not None:
            self.emulators.terminate()
        for server in self.model_servers:
            server.terminate()
        if self.redis is not None:
            self.redis.stop()

    def __enter__(self) -> LocalStack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
