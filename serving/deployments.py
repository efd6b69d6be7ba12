"""Where the model runs: `LocalBackend` (in this process) and the Ray Serve application.

Ray Serve app (`build_app`), ``ingress`` "separate"::

    HTTP -> Serve proxy -> Ingress (CPU; the FastAPI app of serving.api: auth, validation,
              |             media decoding)
              | handle.options(multiplexed_model_id=<adapter id>)
              v
            Backbone replicas (one per GPU, or CPU replicas): model + Engine + AdapterStore view
              | every metrics_push_interval_s
              v
            MetricsBoard (one replica, no resources): latest engine stats of every replica

``ingress`` "backbone" (the default for one backbone replica) drops the Ingress hop: the FastAPI
app runs inside each Backbone replica (`BackboneReplica` with ``http``), on a `ReplicaBackend`
(this replica's engine; audio requests and every replica's stats through the deployments). A
request then crosses one process boundary instead of two: at the tiny embedded default on two
CPU cores the separate Ingress cost about 9 ms of CPU per request, more than the model.

Adapter affinity: the adapter id is the multiplexed model id, so Serve prefers a replica that
already holds the adapter (with the app in the backbone, Serve's proxy routes by the
``serve_multiplexed_model_id`` header, which a client may send). The replica's multiplexed
loader only warms the adapter (`Engine.prefetch`: read and parsed into the CPU cache) and returns
its version, a plain value: Serve's per-replica LRU of ids feeds routing, while the slot pool's
LRU alone decides what stays resident. Nothing is held between requests; each request's slot
reference is taken and released by the engine's scheduler. `@serve.batch` is deliberately not
used: it would split batches by multiplexed id, while our engine mixes adapters in one batch.

Only the Backbone replicas import torch (the model, the engine). Ingress and MetricsBoard exchange
plain values with them (serving.engine_io, dicts), so their processes stay torch-free.

ApiError does not survive Ray's exception wrapping, so replica methods return an `Outcome` and the
ingress re-raises the error. Ray is imported only inside functions: LocalBackend needs none.
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

from petserve.serving.api import BackendInfo, create_app
from petserve.serving.auth import TokenCheck
from petserve.serving.errors import ApiError
from petserve.serving.server_config import ServerConfig
from petserve.serving.store import AdapterStore, StoredAdapter, open_store

log = logging.getLogger(__name__)
STALE_REPLICA_S = 30.0       # a replica silent this long is gone: drop its stats


class LocalBackend:
    """serving.api.Backend on a model, an Engine and an AdapterStore in this process."""

    def __init__(self, model, store: AdapterStore, engine_config, max_adapter_bytes: int,
                 replica: str = "local", generator=None, generator_name: str = "",
                 towers=None, audio=None, audio_model=None) -> None:
        from petserve.serving.engine import Engine
        self.model, self.store, self.replica = model, store, replica
        self.max_adapter_bytes = max_adapter_bytes
        self.engine = Engine(model, store, engine_config, generator, generator_name, towers)
        # The audio family (serving.audio_engine): an engine here (one process), or under Ray
        # only its model, to validate audio uploads (the AudioBackbone deployment serves them).
        self.audio = audio
        self.audio_model = audio.model if audio is not None else audio_model

    @classmethod
    def from_config(cls, config: ServerConfig, replica: str = "local",
                    serve_audio: bool = True, **links) -> LocalBackend:
        """The backend ``config`` names; ``serve_audio`` False (a Ray VL replica): the audio
        backbone is loaded only to check audio uploads against. ``links``: a subclass's own
        constructor arguments (ReplicaBackend's)."""
        from petserve.adapters.backbone import build_backbone
        model = build_backbone(config.backbone or "tiny", device=config.resolved_device())
        store = open_store(config)
        generator, name = None, ""
        if config.generator is not None:
            from petserve.adapters.generative import load_generator
            generator, name = load_generator(config.generator, model), config.generator.stem
        towers = None
        if config.clip is not None:
            from petserve.adapters.clip_towers import load_clip
            towers = load_clip(config.clip, model)
        if serve_audio:
            audio, audio_only_model = audio_engine(config, store), None
        else:
            audio, audio_only_model = None, audio_model(config)
        return cls(model, store, config.engine, config.max_adapter_bytes,
                   replica, generator, name, towers, audio, audio_only_model, **links)

    def start(self) -> None:
        self.engine.start()
        if self.audio is not None:
            self.audio.start()

    def stop(self) -> None:
        self.engine.stop()
        if self.audio is not None:
            self.audio.stop()

    async def health(self) -> None:
        """ApiError 503 ``unhealthy`` when the engine no longer makes progress (/healthz)."""
        try:
            self.engine.check_health()
        except RuntimeError as e:
            raise ApiError(503, "unhealthy", f"this replica is unhealthy: {e}") from None

    async def info(self) -> BackendInfo:
        cfg = self.model.cfg
        return BackendInfo(backbone=cfg.name, fingerprint=self.model.fingerprint,
                           feature_dim=cfg.vision.feat_dim,
                           accepts_pixels=self.model.vision is not None)

    async def generate(self, request):
        return await self.engine.generate(request)

    async def generate_stream(self, request):
        """Engine.stream: each decode step's text, then the InferenceResult."""
        return self.engine.stream(request)

    async def classify(self, request):
        return await self.engine.classify(request)

    async def classify_audio(self, request):
        if self.audio is None:
            raise ApiError.unprocessable("no_audio_backbone", "this server has no audio backbone "
                                         "(start it with --audio-backbone DIR_OR_PRESET)")
        return await self.audio.classify(request)

    def upload_now(self, adapter_id: str, data: bytes) -> StoredAdapter:
        """Validate against this backbone, or the audio one it was made for (serving.uploads),
        then store a new version."""
        from petserve.serving.uploads import prepare_upload
        blob, meta = prepare_upload(data, self.model, self.max_adapter_bytes,
                                    towers=self.engine.towers,
                                    audio=self.audio_model)
        return self.store.put(adapter_id, blob, meta)

    async def upload(self, adapter_id: str, data: bytes) -> StoredAdapter:
        return await asyncio.to_thread(self.upload_now, adapter_id, data)

    async def generate_adapter(self, adapter_id: str, context) -> StoredAdapter:
        """The generator's adapter of ``context``, stored as a new version like an upload."""
        data = await self.engine.generated_adapter(context, name=adapter_id)
        return await asyncio.to_thread(self.upload_now, adapter_id, data)

    async def list(self) -> list[StoredAdapter]:
        def fresh_list():
            self.store.refresh()      # other replicas / processes write to the same store
            return self.store.list()
        return await asyncio.to_thread(fresh_list)

    async def get(self, adapter_id: str) -> StoredAdapter:
        return await asyncio.to_thread(self.store.get, adapter_id)

    async def delete(self, adapter_id: str) -> StoredAdapter:
        return await asyncio.to_thread(self.store.delete, adapter_id)

    async def stats(self) -> dict[str, dict]:
        stats = {self.replica: self.engine.stats()}
        if self.audio is not None:
            stats[f"{self.replica}-audio"] = self.audio.stats()
        return stats


def audio_model(config: ServerConfig):
    """The audio backbone the config names, or None."""
    if config.audio_backbone is None:
        return None
    from petserve.adapters.backbone.audio import build_audio_backbone
    return build_audio_backbone(config.audio_backbone, device=config.resolved_device())


def audio_engine(config: ServerConfig, store: AdapterStore):
    """The audio family's engine when the config names an audio backbone, else None."""
    model = audio_model(config)
    if model is None:
        return None
    from petserve.serving.audio_engine import AudioEngine
    return AudioEngine(model, store, config.engine, config.max_audio_seconds)


def seed_store(store: AdapterStore, files: dict[str, Path], backbone: str,
               max_bytes: int, clip: Path | None = None,
               audio_backbone: str | None = None) -> list[str]:
    """Upload each demo file whose id is not in the store yet, or whose latest version there is
    an earlier build of the same adapter (the same adapter name in its file, other bytes: the
    shipped assets were rebuilt since). An adapter someone uploaded under a demo id with another
    name is left alone. Files are validated against `backbone`, built only when something is
    uploaded; cache adapters against the CLIP text side `clip`; audio adapters against
    `audio_backbone`. Returns the ids of `files`."""
    uploads = {}
    for adapter_id, path in sorted(files.items()):
        data = Path(path).read_bytes()
        try:
            stored = store.get(adapter_id)
        except ApiError:
            uploads[adapter_id] = data
            continue
        if stored.sha256 != hashlib.sha256(data).hexdigest() and \
                stored.meta.get("name") == _adapter_name(data):
            log.info("updating demo adapter %s (v%d is an earlier build)", adapter_id,
                     stored.version)
            uploads[adapter_id] = data
    if uploads:
        from petserve.adapters.backbone import build_backbone
        from petserve.serving.uploads import prepare_upload
        model = build_backbone(backbone)
        towers = None
        if clip is not None:
            from petserve.adapters.clip_towers import load_clip
            towers = load_clip(clip, model)
        audio = None
        if audio_backbone is not None:
            from petserve.adapters.backbone.audio import build_audio_backbone
            audio = build_audio_backbone(audio_backbone)
        for adapter_id, data in uploads.items():
            blob, meta = prepare_upload(data, model, max_bytes, towers=towers, audio=audio)
            store.put(adapter_id, blob, meta)
    return sorted(files)


def _adapter_name(data: bytes) -> str | None:
    from petserve.adapters.adapter_file import AdapterFileError, parse_header
    try:
        header, _ = parse_header(data)
        return json.loads(header["__metadata__"]["petserve"]).get("name")
    except (AdapterFileError, KeyError, TypeError, ValueError):
        return None


@dataclass
class PreparedServer:
    """A config ready for `build_app`: token resolved, embedded default filled in."""

    config: ServerConfig
    token: str
    token_generated: bool
    demo_adapters: list[str]
    notes: list[str]


def prepare_server(config: ServerConfig) -> PreparedServer:
    """Resolve the token; with no backbone, use the embedded default: the shipped demo backbone,
    with the store seeded with the demo adapters."""
    from petserve.adapters.demo import ensure_demo_assets
    from petserve.serving.auth import resolve_token
    resolved = resolve_token(config.token, config.token_env)
    notes, demo = [], []
    assets = None
    if config.backbone is None:
        assets = ensure_demo_assets()
        update = {"backbone": str(assets.backbone_dir)}
        if config.generator is None:
            update["generator"] = assets.generator
        if config.clip is None:
            update["clip"] = assets.clip_text
        files = assets.store_files()
        if config.audio_backbone is None:
            from petserve.adapters.audio_demo import ensure_audio_assets
            audio = ensure_audio_assets()
            update["audio_backbone"] = str(audio.backbone_dir)
            files.update(audio.adapters)
        config = config.model_copy(update=update)
        store = open_store(config)
        demo = seed_store(store, files, config.backbone, config.max_adapter_bytes,
                          config.clip, config.audio_backbone)
    if config.generator is not None and config.generator != getattr(assets, "generator", None):
        check_generator(config.generator, config.backbone)
        notes.append(f"generator {config.generator}")
    if config.adapters_dir is not None:
        files = adapter_files(config.adapters_dir)
        store = open_store(config)
        try:
            seed_store(store, files, config.backbone, config.max_adapter_bytes, config.clip,
                       config.audio_backbone)
        except ApiError as e:
            raise ValueError(f"--adapters {config.adapters_dir}: {e.message}") from None
        notes.append(f"adapters from {config.adapters_dir}: {', '.join(sorted(files))}")
    return PreparedServer(config, resolved.token, resolved.generated, demo, notes)


def check_generator(path: Path, backbone: str) -> None:
    """ValueError naming the problem when ``path`` is not a generator for ``backbone`` (before
    replicas start and fail on it)."""
    from petserve.adapters.backbone import build_backbone
    from petserve.adapters.generative import load_generator
    load_generator(path, build_backbone(backbone))


def adapter_files(directory: Path) -> dict[str, Path]:
    """{id: path} of the ``*.safetensors`` in ``directory`` (id: the name without the suffix)."""
    from petserve.serving.store import ADAPTER_ID_RE
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"--adapters {directory}: no such directory")
    files = {p.stem: p for p in sorted(directory.glob("*.safetensors"))}
    if not files:
        raise ValueError(f"--adapters {directory}: no *.safetensors files there")
    bad = [i for i in files if not re.fullmatch(ADAPTER_ID_RE, i)]
    if bad:
        raise ValueError(f"--adapters {directory}: {bad[0]!r} is not a valid adapter id")
    return files


# ---- Ray Serve --------------------------------------------------------------------------------


@dataclass
class Outcome:
    """A replica method's result, or the ApiError it raised (status, code, message, headers)."""

    value: object = None
    error: tuple[int, str, str, dict] | None = None

    def unwrap(self):
        if self.error is not None:
            raise ApiError(*self.error)
        return self.value


async def _outcome(awaitable) -> Outcome:
    try:
        return Outcome(value=await awaitable)
    except ApiError as e:
        return Outcome(error=(e.status, e.code, e.message, e.headers))


class BackboneReplica:
    """Body of the Backbone deployment: one model + engine per replica (per GPU). With ``http``
    ({"token_digest", "audio": handle or None, "register": bool}) it is also the HTTP ingress
    (deployed through ``serve.ingress``: `__serve_build_asgi_app__`)."""

    async def __init__(self, config: dict, board, http: dict | None = None) -> None:
        # async so that the stats pusher starts on the replica's event loop right away
        from ray import serve
        self.config = ServerConfig.model_validate(config)
        context = serve.get_replica_context()
        self.name = f"{context.deployment}#{context.replica_id.unique_id}"

        async def warm(adapter_id: str) -> int:
            # A plain function: Serve stores its LRU cache as an attribute of what it wraps,
            # which a bound method cannot take. The version it returns has no __del__: Serve
            # dropping an id from its LRU releases nothing.
            return await asyncio.to_thread(self.backend.engine.prefetch, adapter_id)

        # As many ids as the replica has slots: what Serve reports as held here (and routes
        # here) is about what the slot pool can keep resident.
        self._warm = serve.multiplexed(
            max_num_models_per_replica=self.config.engine.num_slots)(warm)
        self._board = board
        if http is None:
            self.backend = LocalBackend.from_config(self.config, self.name, serve_audio=False)
        else:
            self.backend = ReplicaBackend.from_config(
                self.config, self.name, serve_audio=False,
                remote=RayBackend(None, board, http["audio"]),
                register=self._warm if http["register"] else None)
        self.backend.start()
        self._pusher = asyncio.get_running_loop().create_task(self._push_stats_forever())
        if http is not None:
            self._petserve_app = create_app(self.backend, self.config,
                                            TokenCheck(http["token_digest"]))

    def __serve_build_asgi_app__(self):
        return self._petserve_app

    async def _with_adapter(self, request):
        """Submit first, so a request naming an unknown id fails there with its 404 (Serve logs
        every failed multiplexed load as an ERROR: junk ids would fill the logs); then register
        the id with Serve's multiplexing for routing, once per id while its LRU keeps it."""
        from ray import serve
        future = await asyncio.to_thread(self.backend.engine.submit, request)
        adapter_id = serve.get_multiplexed_model_id()
        if adapter_id:
            await self._warm(adapter_id)
        return await asyncio.wrap_future(future)

    async def _push_stats_forever(self) -> None:
        while True:
            try:
                await self._board.report.remote(self.name, self.backend.engine.stats())
            except Exception as e:     # the board restarting must not stop us serving
                log.warning("could not push stats: %s", e)
            await asyncio.sleep(self.config.metrics_push_interval_s)

    def check_health(self) -> None:
        """Ray Serve calls this periodically; raising marks the replica unhealthy and Serve
        replaces it (a broken or hung device, a dead scheduler thread: Engine.check_health)."""
        self.backend.engine.check_health()

    async def generate(self, request) -> Outcome:
        return await _outcome(self._with_adapter(request))

    async def generate_stream(self, request):
        """A streaming generator method (the ingress calls it with ``stream=True``): Outcomes of
        each decode step's text, then of the InferenceResult; an error ends the stream."""
        from ray import serve
        events = self.backend.engine.stream(request)
        try:
            first = await anext(events)      # submit ran: an unknown id fails here, unregistered
            if serve.get_multiplexed_model_id():
                await self._warm(serve.get_multiplexed_model_id())
            yield Outcome(value=first)
            async for item in events:
                yield Outcome(value=item)
        except ApiError as e:
            yield Outcome(error=(e.status, e.code, e.message, e.headers))

    async def classify(self, request) -> Outcome:
        return await _outcome(self.backend.classify(request))

    async def upload(self, adapter_id: str, data: bytes) -> Outcome:
        return await _outcome(self.backend.upload(adapter_id, data))

    async def generate_adapter(self, adapter_id: str, context) -> Outcome:
        return await _outcome(self.backend.generate_adapter(adapter_id, context))

    async def list(self) -> Outcome:
        return await _outcome(self.backend.list())

    async def get(self, adapter_id: str) -> Outcome:
        return await _outcome(self.backend.get(adapter_id))

    async def delete(self, adapter_id: str) -> Outcome:
        return await _outcome(self.backend.delete(adapter_id))

    async def info(self) -> Outcome:
        return await _outcome(self.backend.info())

    async def health(self) -> Outcome:
        return await _outcome(self.backend.health())

    def __del__(self) -> None:
        backend = getattr(self, "backend", None)     # absent when __init__ failed
        if backend is not None:
            backend.stop()


class ReplicaBackend(LocalBackend):
    """serving.api.Backend of a Backbone replica that serves HTTP itself (``ingress``
    "backbone"): inference, uploads and reads on this replica's engine and the shared store;
    audio requests and the engine stats of every replica through the deployments (`remote`, a
    RayBackend). With ``register`` (more than one replica), each answered request's adapter id is
    reported to Serve's multiplexing, so the proxy routes requests that carry it in the
    ``serve_multiplexed_model_id`` header here."""

    def __init__(self, *args, remote: RayBackend, register=None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.remote, self.register = remote, register

    async def _registered(self, request, answer):
        if self.register is not None and isinstance(request.adapter, str):
            await self.register(request.adapter)
        return answer

    async def generate(self, request):
        return await self._registered(request, await super().generate(request))

    async def classify(self, request):
        return await self._registered(request, await super().classify(request))

    async def classify_audio(self, request):
        return await self.remote.classify_audio(request)

    async def stats(self) -> dict[str, dict]:
        return await self.remote.stats()


class AudioReplica:
    """Body of the AudioBackbone deployment: the audio family's AST + AudioEngine (one replica
    per GPU, beside the VL Backbone deployment; DESIGN: one deployment per family)."""

    async def __init__(self, config: dict, board) -> None:
        from ray import serve
        self.config = ServerConfig.model_validate(config)
        context = serve.get_replica_context()
        self.name = f"{context.deployment}#{context.replica_id.unique_id}"
        store = open_store(self.config)
        self.engine = audio_engine(self.config, store)
        self.engine.start()
        self._board = board
        self._pusher = asyncio.get_running_loop().create_task(self._push_stats_forever())

    async def _push_stats_forever(self) -> None:
        while True:
            try:
                await self._board.report.remote(self.name, self.engine.stats())
            except Exception as e:     # the board restarting must not stop us serving
                log.warning("could not push stats: %s", e)
            await asyncio.sleep(self.config.metrics_push_interval_s)

    def check_health(self) -> None:
        problem = self.engine.health_problem()
        if problem is not None:
            raise RuntimeError(problem)

    async def classify_audio(self, request) -> Outcome:
        return await _outcome(self.engine.classify(request))

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.stop()


class MetricsBoard:
    """Latest engine stats of every Backbone replica (they push; /metrics reads)."""

    def __init__(self) -> None:
        self._latest: dict[str, tuple[float, dict]] = {}

    def report(self, replica: str, stats: dict) -> None:
        self._latest[replica] = (time.monotonic(), stats)

    def collect(self) -> dict[str, dict]:
        now = time.monotonic()
        self._latest = {r: v for r, v in self._latest.items() if now - v[0] < STALE_REPLICA_S}
        return {replica: stats for replica, (_, stats) in self._latest.items()}


@contextlib.contextmanager
def _replica_errors():
    """Ray's errors of a call to a deployment as the ApiErrors a client can act on (503)."""
    from ray.exceptions import RayActorError
    from ray.serve.exceptions import (
        BackPressureError,
        DeploymentUnavailableError,
        ReplicaUnavailableError,
    )
    try:
        yield
    except BackPressureError:
        raise ApiError.overloaded(1.0, "every backbone replica is busy; retry later") from None
    except (RayActorError, ReplicaUnavailableError, DeploymentUnavailableError) as e:
        # A replica died or is restarting: the client's retry will find a live one.
        log.warning("backbone replica unavailable: %s", e)
        raise ApiError.overloaded(1.0, "a backbone replica is unavailable; retry") from None


class RayBackend:
    """serving.api.Backend that calls the Backbone deployment (adapter id = multiplexed id)."""

    def __init__(self, backbone, board, audio=None) -> None:
        self.backbone, self.board, self.audio = backbone, board, audio

    def _handle(self, adapter, stream: bool = False):
        options = {"stream": True} if stream else {}
        if adapter is not None and not isinstance(adapter, tuple):
            options["multiplexed_model_id"] = adapter
        return self.backbone.options(**options) if options else self.backbone

    async def _call(self, method: str, *args, adapter: str | None = None, handle=None):
        with _replica_errors():
            outcome = await getattr(handle or self._handle(adapter), method).remote(*args)
        return outcome.unwrap()

    async def info(self) -> BackendInfo:
        return await self._call("info")

    async def health(self) -> None:
        """The replica that answers (Serve replaces unhealthy ones through check_health)."""
        return await self._call("health")

    async def generate(self, request):
        return await self._call("generate", request, adapter=request.adapter)

    async def generate_stream(self, request):
        """The replica's generate_stream: its first item (or error) awaited here, so that a
        refused request raises before a response starts; then the rest as an async iterator."""
        outcomes = self._handle(request.adapter, stream=True).generate_stream.remote(request)
        with _replica_errors():
            first = (await anext(outcomes)).unwrap()

        async def rest():
            yield first
            async for outcome in outcomes:
                yield outcome.unwrap()
        return rest()

    async def classify(self, request):
        return await self._call("classify", request, adapter=request.adapter)

    async def classify_audio(self, request):
        if self.audio is None:
            raise ApiError.unprocessable("no_audio_backbone", "this server has no audio backbone "
                                         "(start it with --audio-backbone DIR_OR_PRESET)")
        return await self._call("classify_audio", request, handle=self.audio)

    async def upload(self, adapter_id: str, data: bytes) -> StoredAdapter:
        return await self._call("upload", adapter_id, data, adapter=adapter_id)

    async def generate_adapter(self, adapter_id: str, context) -> StoredAdapter:
        return await self._call("generate_adapter", adapter_id, context, adapter=adapter_id)

    async def list(self) -> list[StoredAdapter]:
        return await self._call("list")

    async def get(self, adapter_id: str) -> StoredAdapter:
        return await self._call("get", adapter_id)

    async def delete(self, adapter_id: str) -> StoredAdapter:
        return await self._call("delete", adapter_id)

    async def stats(self) -> dict[str, dict]:
        return await self.board.collect.remote()


class Ingress:
    """Body of the Ingress deployment: serving.api's app on a RayBackend."""

    def __init__(self, backbone, board, config: dict, token_digest: str, audio=None) -> None:
        # Not `self.app`: Serve's ASGI wrapper owns that name.
        self._petserve_app = create_app(RayBackend(backbone, board, audio),
                                        ServerConfig.model_validate(config),
                                        TokenCheck(token_digest))

    def __serve_build_asgi_app__(self):
        return self._petserve_app


# ---- the application --------------------------------------------------------------------------


def _gpu_per_replica(config: ServerConfig) -> int:
    if config.device != "auto":
        return int(config.device == "cuda")
    import ray
    return int(ray.is_initialized() and ray.cluster_resources().get("GPU", 0) >= 1)


def _backbone_options(config: ServerConfig) -> dict:
    options = {
        "name": "Backbone",
        "ray_actor_options": {"num_gpus": _gpu_per_replica(config),
                              "num_cpus": config.backbone_cpus},
        # Serve's default (5) would starve our batcher: admit what the engine can queue.
        "max_ongoing_requests": config.engine.max_queue + config.engine.max_batch_rows,
        "logging_config": {"log_level": config.log_level},
    }
    if config.autoscaling is not None:
        options["autoscaling_config"] = config.autoscaling.model_dump()
    else:
        options["num_replicas"] = config.replicas
    return options


def build_app(config: ServerConfig, token: str):
    """The bound Ray Serve application (pass it to `serve.run`). `config.backbone` must be set
    (see `prepare_server`); the token reaches the replicas only as its sha256."""
    from ray import serve

    from petserve.serving.auth import token_digest
    public = config.model_dump(mode="json", exclude={"token"})
    board = serve.deployment(MetricsBoard, name="MetricsBoard", num_replicas=1,
                             ray_actor_options={"num_cpus": 0},
                             logging_config={"log_level": "WARNING"}).bind()  # pushed every second
    options = _backbone_options(config)
    audio = None
    if config.audio_backbone is not None:
        # one replica of each family per GPU: each takes half of it
        gpus = options["ray_actor_options"]["num_gpus"] / 2
        options["ray_actor_options"]["num_gpus"] = gpus
        audio = serve.deployment(AudioReplica, **{
            **options, "name": "AudioBackbone",
            "ray_actor_options": {"num_gpus": gpus, "num_cpus": config.audio_cpus}}).bind(public, board)
    if config.ingress_in_backbone():
        http = {"token_digest": token_digest(token), "audio": audio,
                "register": config.many_replicas()}
        return serve.deployment(serve.ingress()(BackboneReplica), **options).bind(
            public, board, http)
    backbone = serve.deployment(BackboneReplica, **options).bind(public, board)
    ingress = serve.deployment(
        serve.ingress()(Ingress), name="Ingress", num_replicas=config.ingress_replicas,
        max_ongoing_requests=4 * (config.engine.max_queue + config.engine.max_batch_rows),
        ray_actor_options={"num_cpus": config.ingress_cpus},
        logging_config={"log_level": config.log_level})
    return ingress.bind(backbone, board, public, token_digest(token), audio)


def app_builder(args: dict):
    """Entry point of `serve run serving/serve_config.yaml`: `args` is a ServerConfig."""
    prepared = prepare_server(ServerConfig.model_validate(args or {}))
    for note in prepared.notes:
        print(f"petserve: {note}")
    if prepared.token_generated:
        print(f"petserve: write token (set {prepared.config.token_env} to choose one): "
              f"{prepared.token}")
    return build_app(prepared.config, prepared.token)
