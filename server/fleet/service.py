"""`edgefleet-server run`: ingestion, the HTTP API and store maintenance in one process."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvicorn
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from pydantic import BaseModel, ConfigDict, Field

from edgefleet.agent.bundle import key_id, load_private_key, load_public_key
from edgefleet.server.catalogue.api import CatalogueParts
from edgefleet.server.catalogue.files import CatalogueFiles
from edgefleet.server.catalogue.jobs import JobRunner
from edgefleet.server.federated.evaluate import Holdout, load_holdout
from edgefleet.server.federated.mqtt import MqttTaskPublisher
from edgefleet.server.federated.rounds import RoundEngine
from edgefleet.server.fleet.api import RolloutParts, create_app
from edgefleet.server.fleet.client_id import coordinator_client_id, state_dir_for
from edgefleet.server.fleet.commander import Commander
from edgefleet.server.fleet.gc_tuning import tune_gc
from edgefleet.server.fleet.http_guard import DEFAULT_MAX_BODY_BYTES
from edgefleet.server.fleet.ingest import IngestConfig, Ingestor
from edgefleet.server.fleet.store import open_store
from edgefleet.server.fleet.store.base import RetentionPolicy, Store
from edgefleet.server.retune.config import LoopConfig
from edgefleet.server.retune.engine import RetuneEngine
from edgefleet.server.rollout.archives import ArchiveStore
from edgefleet.server.rollout.engine import EngineSettings, RolloutEngine
from edgefleet.server.rollout.mqtt import MqttPublisher, MqttSender

log = logging.getLogger(__name__)


class CoordinatorConfig(BaseModel):
    """Everything one coordinator process needs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    store: str = Field(description="sqlite:///path.db, a path, or a PostgreSQL DSN/URL.")
    mqtt: IngestConfig = IngestConfig()
    http_host: str = "127.0.0.1"
    http_port: int = Field(8080, ge=0, le=65535, description="0 picks a free port.")
    token: str | None = Field(None, description="Bearer token for actions; None disables them.")
    http_max_body_bytes: int = Field(
        DEFAULT_MAX_BODY_BYTES, ge=0,
        description="Largest HTTP request body accepted; a larger one is refused with 413.",
    )
    loss_grace_s: float = Field(
        300.0, ge=1, description="A gap open this long after newer windows arrived is a loss."
    )
    maintenance_every_s: float = Field(30.0, gt=0)
    retention_every_s: float = Field(3600.0, gt=0)
    retention: RetentionPolicy = RetentionPolicy()
    fleet_keys: list[Path] = Field(
        default_factory=list,
        description="Public keys whose bundles may be rolled out; none: uploads are refused.",
    )
    bundles_dir: Path | None = Field(
        None, description="Uploaded bundle archives; default: state_dir/bundles."
    )
    upload_max_bytes: int = Field(1 << 30, ge=1, description="Largest bundle archive accepted.")
    rollout_tick_s: float = Field(1.0, gt=0, description="How often rollouts take a step.")
    rollout_resend_s: float = Field(
        30.0, gt=0, description="An in-flight device silent this long is sent its install again."
    )
    state_dir: Path | None = Field(
        None,
        description="Where the coordinator keeps its own state (its MQTT client id); default: "
        "the SQLite store's directory, else $STATE_DIRECTORY (systemd), else /var/lib/edgefleet.",
    )
    signing_key: Path | None = Field(
        None,
        description="The fleet's private key (KEYDIR/fleet.key): federated rounds sign and roll "
        "out their result; None: a round stops at 'aggregated' with an unsigned candidate.",
    )
    loop: LoopConfig = Field(
        default_factory=LoopConfig,
        description="The closed loop that keeps groups on their latency targets.",
    )
    fed_holdout: Path | None = Field(
        None,
        description="Held-out labelled images (.npz: images, labels) that judge a round's new "
        "heads; None: the devices' reported validation accuracy judges them.",
    )
    catalogue_dir: Path | None = Field(
        None,
        description="The model catalogue's files (source models, data, build logs); default: "
        "state_dir/catalogue. Builds sign with signing_key; without it they are refused.",
    )

    def own_state_dir(self) -> Path:
        """state_dir, else where the store's location says."""
        return self.state_dir or state_dir_for(self.store)

    def ingest_config(self) -> IngestConfig:
        """mqtt with its client id filled in: as configured, else the username, else this
        installation's id (made once in state_dir, the same across restarts)."""
        if self.mqtt.client_id is not None:
            return self.mqtt
        state_dir = self.state_dir or state_dir_for(self.store)
        client_id = coordinator_client_id(state_dir, self.mqtt.username)
        return self.mqtt.model_copy(update={"client_id": client_id})


@dataclass
class Coordinator:
    """A running coordinator; stop() ends it cleanly."""

    cfg: CoordinatorConfig
    store: Store = field(init=False)
    ingestor: Ingestor = field(init=False)
    archives: ArchiveStore = field(init=False)
    engine: RolloutEngine = field(init=False)
    rounds: RoundEngine = field(init=False)
    retune: RetuneEngine = field(init=False)
    builds: JobRunner = field(init=False)
    http: uvicorn.Server = field(init=False)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> None:
        keys = [load_public_key(p) for p in self.cfg.fleet_keys]
        # Checked before anything starts: a bad key or holdout stops the coordinator at once.
        signing, holdout = self._fed_inputs(keys)
        self.store = open_store(self.cfg.store)
        self.ingestor = Ingestor(self.cfg.ingest_config(), self.store, writer_url=self.cfg.store)
        self.archives = ArchiveStore(
            self.cfg.bundles_dir or self.cfg.own_state_dir() / "bundles", keys
        )
        self.engine = RolloutEngine(
            self.store,
            self.archives,
            MqttSender(self.ingestor),
            MqttPublisher(self.ingestor),
            settings=EngineSettings(resend_s=self.cfg.rollout_resend_s),
        )
        self.rounds = RoundEngine(
            self.store,
            self.archives,
            self.engine,
            MqttTaskPublisher(self.ingestor),
            work_dir=self.cfg.own_state_dir() / "fed",
            signing_key=signing,
            holdout=holdout,
        )
        self.retune = RetuneEngine(
            self.store,
            self.engine,
            MqttSender(self.ingestor),
            settings=self.cfg.loop.settings(),
            build=self._loop_build if self.cfg.loop.build else None,
        )
        catalogue = CatalogueFiles(self.cfg.catalogue_dir or self.cfg.own_state_dir() / "catalogue")
        self.builds = JobRunner(self.store, catalogue, self.archives, self.cfg.signing_key)
        # Jobs a killed coordinator left running fail now; queued ones are run in order.
        self.builds.recover()
        app = create_app(
            self.store,
            token=self.cfg.token,
            commander=Commander(self.ingestor),
            stats=self.ingestor.stats,
            max_body_bytes=self.cfg.http_max_body_bytes,
            rollouts=RolloutParts(self.engine, self.archives, self.cfg.upload_max_bytes),
            rounds=self.rounds,
            retune=self.retune,
            catalogue=CatalogueParts(catalogue, self.builds, self.archives,
                                     self.cfg.upload_max_bytes),
        )
        self.http = uvicorn.Server(
            uvicorn.Config(
                app,
                host=self.cfg.http_host,
                port=self.cfg.http_port,
                log_level="warning",
                # uvicorn's default dictConfig closes every handler the embedding process
                # (the demo, a test) already set up; its loggers propagate to ours instead.
                log_config=None,
            )
        )
        tune_gc()
        self.ingestor.start()
        self._spawn(self.http.run, "http")
        self._spawn(self._maintain, "maintenance")
        self._spawn(self._roll, "rollouts")
        self._spawn(self._retune, "closed-loop")
        self.builds.start()
        deadline = time.monotonic() + 10
        while not self.http.started and time.monotonic() < deadline:
            time.sleep(0.05)
        log.info("coordinator %s: HTTP on %s, store %s", self.ingestor.cfg.client_id, self.url,
                 self.cfg.store.split("@")[-1])

    def _fed_inputs(
        self, keys: list[Ed25519PublicKey]
    ) -> tuple[Ed25519PrivateKey | None, Holdout | None]:
        """The signing key (one the archive store trusts) and the held-out set, if given."""
        signing = None
        if self.cfg.signing_key is not None:
            signing = load_private_key(self.cfg.signing_key)
            if key_id(signing.public_key()) not in {key_id(k) for k in keys}:
                raise ValueError(
                    f"signing key {self.cfg.signing_key} ({key_id(signing.public_key())}) is "
                    "not among the --fleet-key keys: its bundles would not verify"
                )
        holdout = load_holdout(self.cfg.fed_holdout) if self.cfg.fed_holdout else None
        return signing, holdout

    @property
    def url(self) -> str:
        """Base URL of the HTTP API (with the real port when 0 was asked)."""
        port = self.cfg.http_port
        for server in getattr(self.http, "servers", []):
            for sock in server.sockets:
                port = sock.getsockname()[1]
        return f"http://{self.cfg.http_host}:{port}"

    def _spawn(self, target: object, name: str) -> None:
        t = threading.Thread(target=target, name=name, daemon=True)  # type: ignore[arg-type]
        t.start()
        self._threads.append(t)

    def _maintain(self) -> None:
        last_retention = time.monotonic()
        while not self._stop.wait(self.cfg.maintenance_every_s):
            try:
                lost = self.store.declare_losses(time.time(), self.cfg.loss_grace_s)
                if lost:
                    log.warning("declared %d telemetry sequence numbers lost", lost)
                if time.monotonic() - last_retention >= self.cfg.retention_every_s:
                    last_retention = time.monotonic()
                    out = self.store.apply_retention(time.time(), self.cfg.retention)
                    log.info("retention: %s", out)
            except Exception as exc:  # the store may be briefly unreachable; try next round
                log.error("store maintenance failed: %s", exc)

    def _roll(self) -> None:
        """Rollouts and rounds take a step every tick; a store outage only delays them."""
        while not self._stop.wait(self.cfg.rollout_tick_s):
            if not self.ingestor.connected.is_set():
                continue  # commands, chunks and tasks need the broker; the store keeps state
            try:
                self.engine.tick()
            except Exception as exc:
                log.error("rollout step failed: %s", exc)
            try:
                self.rounds.tick()
            except Exception as exc:
                log.error("federated round step failed: %s", exc)

    def _retune(self) -> None:
        """The closed loop takes a step every loop.tick_s; a failure only delays it."""
        while not self._stop.wait(self.cfg.loop.tick_s):
            if not self.ingestor.connected.is_set():
                continue  # pins and rollouts need the broker
            try:
                self.retune.tick()
            except Exception as exc:
                log.error("closed loop step failed: %s", exc)

    def _loop_build(self, model: str, options: dict[str, Any]) -> str:
        """A build the loop asks for (a faster variant); its job id."""
        from edgefleet.server.catalogue.jobs import submit
        from edgefleet.server.catalogue.options import BuildOptions

        job = submit(self.store, model, BuildOptions.model_validate(options), "loop")
        self.builds.wake()
        return str(job.job_id)

    def stop(self) -> None:
        self._stop.set()
        self.http.should_exit = True
        self.ingestor.stop()
        self.builds.stop()
        for t in self._threads:
            t.join(10)
        self.store.close()
