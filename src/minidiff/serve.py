"""``minidiff serve``: a local page that shows a sampler at work, step by step.

The page (``minidiff/web/``, served from package data: nothing comes from another host) sends
one JSON request per press of Generate or Compare::

    POST /api/generate  {"seed": 0, "n": 16, "runs": [{"model": "reduced", "sampler": "ddim",
                                                       "steps": 20, "eta": 1.0}, ...]}

with one setting (Generate) or two (Compare). A setting for a class-conditional model may add
``"digit"`` (0–9, or ``"all"``: one row per digit, n rounded up to a multiple of ten) and
``"guidance"`` (w >= 0, DEFAULT_GUIDANCE unless given; only with a digit); without a digit such a
model draws unconditionally. Every run is ``generate.generate`` with a callback, from the same
x_T = ``generate.initial_noise(n, seed)``, so its final grid is what ``minidiff sample MODEL -n N
--seed S [--digit D --guidance W]`` writes with the same settings.
The answer is a text/event-stream of JSON events:

- ``queued``: how many generations are ahead of this one;
- ``start``: a run's settings, its number of steps and x_T as a PNG data URL;
- ``frame``: after each network evaluation, the step, t, its milliseconds, and the x_t and x̂_0
  grids as PNG data URLs (the samplers' ``callback`` dict);
- ``done``: the run's sampling seconds (the steps alone) and wall seconds (frames included);
- ``end`` after the last run, or ``error`` with a message.

``GET /api/models`` lists the models (names and file names, not where the files are, which are
conditional, and each one's own sampler and steps: a consistency student's, the default for the
rest, which a run that names no sampler gets) and bounds the page offers; ``GET /api/status`` the running and waiting generations
and what became of the others. A bad request is answered 4xx with ``{"error": "..."}`` before
anything runs; so is one whose Host header is not one of the server's own names (``host_names``):
a site that points its own DNS name at this machine (DNS rebinding) reads nothing. Load is
bounded: one generation samples at a time (one worker thread; torch keeps its own thread count),
at most ``queue_size`` more wait, and a request beyond that is answered 503. A client that goes
away (page closed, Stop pressed) cancels its generation: the worker checks between sampler steps;
one that leaves while still sending its request is dropped without a word in the log. One that
stays but reads nothing for ``STALL_S`` loses its generation too, so it cannot hold the worker.
"""
from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import io
import ipaddress
import json
import socket
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import anyio
import torch
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, JSONResponse, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from .config import (DEFAULT_DDIM_ETA, DEFAULT_GUIDANCE, DEFAULT_SAMPLING, DEFAULT_STEPS, MNIST_CLASSES, SAMPLERS,
                     ConfigError, SamplingSpec, check_guidance, default_sampler)
from .data import to_uint8
from .diffusion import Schedule
from .generate import digit_labels, generate, grid_image, initial_noise
from .metrics import count_params
from .models.unet import SimpleUnet, fold_batchnorm, num_classes
from .runtime import default_device, resolve_precision
from .modelfile import load_model

WEB_DIR = Path(__file__).parent / "web"
MAX_IMAGES = 64        # per request: 64 images × 200 steps is the largest job one click can ask for
QUEUE_SIZE = 4         # generations that may wait behind the running one
MAX_BODY = 16_384      # bytes; a request is ~200
FRAME_BUFFER = 4       # frames drawn ahead of a slow client; the sampler waits beyond that
STALL_S = 30.0         # a client that reads nothing for this long loses its generation
# Host names that reach this machine only: always answered (no other site can be named so)
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


class BadRequest(ValueError):
    """A request that cannot run; answered 400 with the message."""


class Cancelled(Exception):
    """Raised in the worker thread between sampler steps once the client has gone."""


@dataclass(frozen=True)
class Setting:
    """One run of a request: which model, which sampler and how many steps; for a conditional
    model, which digit (0–9, "all" or None: unconditional) at which guidance weight w."""

    model: str
    sampler: str
    steps: int
    eta: float
    digit: int | str | None = None
    guidance: float | None = None


@dataclass(frozen=True)
class Job:
    """A parsed request: one run (Generate) or two from the same x_T (Compare)."""

    seed: int
    n: int                   # images every run draws
    runs: tuple[Setting, ...]
    nrow: int | None = None  # images a grid row: n / 10 when a run draws "all" (one row per digit)


@dataclass(frozen=True)
class Model:
    """A loaded network, its schedule, the precision it samples in and what the page shows."""

    net: torch.nn.Module
    sched: Schedule
    device: torch.device
    precision: str
    info: dict[str, Any]


def load_models(paths: dict[str, Path], device: torch.device | None = None) -> dict[str, Model]:
    """Load every model once, as ``minidiff sample`` does (in DEFAULT_SAMPLING's precision); a bad file raises
    CheckpointError here, at start-up, not on the first request."""
    device = device or default_device()
    precision = resolve_precision(DEFAULT_SAMPLING.precision, device)
    models = {}
    for name, path in paths.items():
        net, sched, meta = load_model(path, device)
        params = count_params(net)["total"]
        net = fold_batchnorm(net) if isinstance(net, SimpleUnet) else net  # once, not per request
        # the file's name only: the page (and anyone who can reach it) need not see where it lives
        # its own sampling where none is asked for: a consistency student's sampler and steps
        own = SamplingSpec(sampler=default_sampler(meta.get("config", {}).get("objective"))).for_schedule(sched.T)
        info = dict(name=name, file=Path(path).name, arch=meta.get("arch"), T=sched.T,
                    params=params, precision=precision, conditional=num_classes(net) > 0,
                    sampler=own.sampler, steps=own.steps)
        models[name] = Model(net, sched, device, precision, info)
    return models


def _int(body: dict, key: str, lo: int, hi: int, what: str) -> int:
    v = body.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise BadRequest(f"{what} must be an integer in [{lo}, {hi}], got {json.dumps(v)}")
    return v


def parse_setting(d: Any, models: dict[str, Model]) -> Setting:
    """Check one run's settings against the loaded models; BadRequest names what is wrong. The
    sampling rules are SamplingSpec's, the same as ``minidiff sample``'s."""
    if not isinstance(d, dict):
        raise BadRequest(f"each run must be a JSON object, got {json.dumps(d)}")
    if d.get("model") not in models:
        raise BadRequest(f"unknown model {json.dumps(d.get('model'))}; choose one of {', '.join(models)}")
    for key, kind in (("steps", "an integer"), ("eta", "a number")):  # JSON's types, before the spec's rules
        v = d.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int if key == "steps" else (int, float))):
            raise BadRequest(f"{key} must be {kind}, got {json.dumps(v)}")
    try:
        # what the request leaves out is the model's own (``load_models``: a consistency student's
        # sampler, DEFAULT_SAMPLING's for the rest; steps and η: the sampler's own default)
        spec = SamplingSpec(sampler=d.get("sampler", models[d["model"]].info["sampler"]), steps=d.get("steps"),
                            eta=d.get("eta"))
        spec = spec.for_schedule(models[d["model"]].sched.T)
    except ConfigError as e:
        raise BadRequest(str(e)) from None
    return Setting(d["model"], spec.sampler, spec.steps, spec.eta, *parse_labels(d, models[d["model"]]))


def parse_labels(d: dict, model: Model) -> tuple[int | str | None, float | None]:
    """A run's digit and guidance weight, by ``minidiff sample --digit D --guidance W``'s rules: a
    digit 0–9 or "all" and a finite w >= 0 (DEFAULT_GUIDANCE where only the digit is given), for
    a conditional model only, w only with a digit; (None, None) for an unconditional draw."""
    digit, w = d.get("digit"), d.get("guidance")
    if digit is None and w is None:
        return None, None
    if not model.info["conditional"]:
        raise BadRequest(f"model {json.dumps(model.info['name'])} is unconditional (trained without labels): "
                         "it takes no digit and no guidance")
    if digit is None:
        raise BadRequest("guidance needs a digit: without one a conditional model draws unconditionally")
    if not (digit == "all" or (type(digit) is int and 0 <= digit < MNIST_CLASSES)):  # not True, not 3.0
        raise BadRequest(f'digit must be a digit 0–{MNIST_CLASSES - 1} or "all", got {json.dumps(digit)}')
    if w is None:
        return digit, DEFAULT_GUIDANCE
    if isinstance(w, bool) or not isinstance(w, (int, float)):
        raise BadRequest(f"guidance must be a number, got {json.dumps(w)}")
    try:
        return digit, check_guidance(w)
    except ConfigError as e:
        raise BadRequest(str(e)) from None


def run_labels(digit: int | str | None, n: int) -> torch.Tensor | None:
    """The labels of a run's n samples, as ``minidiff sample --digit`` draws them (``digit_labels``:
    "all" is a row of n / 10 per digit); None for an unconditional draw."""
    if digit is None:
        return None
    return digit_labels(list(range(MNIST_CLASSES)) if digit == "all" else [digit], n)[0]


def parse_job(body: Any, models: dict[str, Model], max_images: int = MAX_IMAGES) -> Job:
    """A request body (parsed JSON) as a Job; BadRequest with a one-line reason otherwise."""
    if not isinstance(body, dict):
        raise BadRequest("the request must be a JSON object with seed, n and runs")
    unknown = sorted(set(body) - {"seed", "n", "runs"})
    if unknown:
        raise BadRequest(f"unknown field(s) {', '.join(unknown)}; a request has seed, n and runs")
    n = _int(body, "n", 1, max_images, "the number of images")
    seed = _int(body, "seed", 0, 2**32 - 1, "seed")
    runs = body.get("runs")
    if not isinstance(runs, list) or len(runs) not in (1, 2):
        raise BadRequest("runs must be a list of one setting (Generate) or two (Compare)")
    settings = tuple(parse_setting(r, models) for r in runs)
    if not any(s.digit == "all" for s in settings):
        return Job(seed, n, settings)
    # one row of k per digit, as `minidiff sample --digit all` draws them; a run beside it in
    # Compare draws as many from the same x_T, in the same rows
    k = -(-n // MNIST_CLASSES)  # digit_labels' rounding
    if k * MNIST_CLASSES > max_images:
        raise BadRequest(f'digit "all" rounds the number of images up to a multiple of {MNIST_CLASSES}, '
                         f"{k * MNIST_CLASSES} here, more than the {max_images} a request may draw")
    return Job(seed, k * MNIST_CLASSES, settings, nrow=k)


def png_data_url(x: torch.Tensor, nrow: int | None = None) -> str:
    """Float images (N, 1, 28, 28) in [-1, 1] as one PNG grid (``nrow`` a row, default a square),
    as a data: URL."""
    buf = io.BytesIO()
    grid_image(to_uint8(x.detach().cpu()), nrow).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def sample_job(job: Job, models: dict[str, Model], emit: Callable[[dict], None],
               cancelled: Callable[[], bool]) -> None:
    """Run a job's settings one after the other from the same x_T, calling ``emit`` with every
    event; raises Cancelled between steps once ``cancelled()``. Runs in the worker thread."""
    for i, setting in enumerate(job.runs):
        m = models[setting.model]
        x_T = initial_noise(job.n, job.seed, m.device)
        labels = run_labels(setting.digit, job.n)
        emit(dict(type="start", run=i, setting=asdict(setting), steps=setting.steps,
                  x_T=png_data_url(x_T, job.nrow)))
        sampling_s = 0.0
        start = last = time.perf_counter()

        def callback(info: dict[str, Any]) -> None:  # the samplers' dict: step, steps, t, x, x0
            nonlocal sampling_s, last
            if info["x"].is_cuda:
                torch.cuda.synchronize(info["x"].device)
            ms = (time.perf_counter() - last) * 1000
            sampling_s += ms / 1000
            if cancelled():
                raise Cancelled
            emit(dict(type="frame", run=i, step=info["step"], t=info["t"], ms=ms,
                      x_t=png_data_url(info["x"], job.nrow), x0=png_data_url(info["x0"], job.nrow)))
            last = time.perf_counter()  # drawing and sending the frame is not the step's time

        spec = SamplingSpec(setting.sampler, setting.steps, eta=setting.eta, seed=job.seed,
                            batch_size=job.n, precision=m.precision)
        generate(m.net, m.sched, job.n, spec, progress=False, x_T=x_T, fold_bn=False, callback=callback,
                 labels=labels, guidance=None if labels is None else setting.guidance)
        emit(dict(type="done", run=i, sampling_s=sampling_s, wall_s=time.perf_counter() - start))
    emit(dict(type="end"))


class Worker:
    """The one sampling thread, the generations admitted to it and its counters. The thread
    takes jobs in order, so one samples at a time; ``admitted`` (running + waiting) is bounded."""

    def __init__(self, models: dict[str, Model], queue_size: int):
        self.models = models
        self.queue_size = queue_size
        self.executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="minidiff-serve")
        self.admitted = 0      # changed on the event loop only
        self.running = False   # set by the sampling thread
        self.live: set[Generation] = set()
        self.counts = dict(finished=0, cancelled=0, failed=0, frames=0)

    def admit(self, job: Job) -> Generation:
        """A Generation for ``job``, or HTTPException 503 when the queue is full."""
        if self.admitted >= 1 + self.queue_size:
            raise HTTPException(503, f"busy: {self.admitted} generations are running or waiting "
                                     f"(at most 1 + {self.queue_size}); try again when one finishes")
        self.admitted += 1
        gen = Generation(self, job, ahead=self.admitted - 1)
        self.live.add(gen)
        return gen

    def status(self) -> dict[str, Any]:
        running = int(self.running)
        return dict(running=running, waiting=max(self.admitted - running, 0),
                    queue_size=self.queue_size, **self.counts)

    def stop(self) -> None:
        """Cancel every generation at its next step (thread- and signal-safe)."""
        for gen in list(self.live):
            gen.cancel.set()

    async def shutdown(self) -> None:
        self.stop()
        await asyncio.to_thread(self.executor.shutdown, True)


class Generation:
    """One admitted request: its job on the sampling thread and the event stream that carries
    the job's events to the client. Its place in the queue is freed when the job ends or the
    client leaves, whichever comes first; a client that leaves cancels the job."""

    def __init__(self, worker: Worker, job: Job, ahead: int):
        self.worker, self.job, self.ahead = worker, job, ahead
        self.cancel = threading.Event()
        self.released = False
        self.frames: asyncio.Queue[dict] = asyncio.Queue(maxsize=FRAME_BUFFER)

    async def events(self) -> AsyncIterator[str]:
        loop = asyncio.get_running_loop()
        work = loop.run_in_executor(self.worker.executor, self._work, loop)
        yield _sse(dict(type="queued", ahead=self.ahead))
        while True:
            getter = asyncio.ensure_future(self.frames.get())
            try:
                await asyncio.wait({getter, work}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                if not getter.done():
                    getter.cancel()  # an event it has not taken stays in the queue
            if getter.cancelled() or not getter.done():  # the job has ended
                if self.frames.empty():                  # and every event it sent is out
                    return
                continue
            event = getter.result()
            yield _sse(event)
            if event["type"] in ("end", "error"):
                return

    def _work(self, loop: asyncio.AbstractEventLoop) -> None:
        """The job, on the sampling thread."""
        counts, ended = self.worker.counts, False

        def emit(event: dict) -> None:
            nonlocal ended
            if event["type"] == "end":  # counted before the client can see it and ask /api/status
                counts["finished"], ended = counts["finished"] + 1, True
            self._emit(loop, event)
        try:
            if self.cancel.is_set():  # the client left while waiting
                raise Cancelled
            self.worker.running = True
            sample_job(self.job, self.worker.models, emit, self.cancel.is_set)
        except Cancelled:
            if not ended:  # a client that leaves as the last event goes out had its job finished
                counts["cancelled"] += 1
        except Exception as e:  # a failure is the page's to show; the server keeps serving
            counts["failed"] += 1
            with contextlib.suppress(Cancelled):
                self._emit(loop, dict(type="error", error=f"sampling failed: {type(e).__name__}: {e}"))
        finally:
            self.worker.running = False
            with contextlib.suppress(RuntimeError):  # the loop is gone: the server has stopped
                loop.call_soon_threadsafe(self.release)

    def _emit(self, loop: asyncio.AbstractEventLoop, event: dict) -> None:
        """Hand an event to the stream (sampling thread). Waits while FRAME_BUFFER events are
        unsent; raises Cancelled once the client has left or has read nothing for STALL_S."""
        fut = asyncio.run_coroutine_threadsafe(self.frames.put(event), loop)
        deadline = time.monotonic() + STALL_S
        while True:
            try:
                fut.result(timeout=0.2)
                break
            except concurrent.futures.TimeoutError:
                if self.cancel.is_set() or time.monotonic() > deadline:
                    fut.cancel()
                    raise Cancelled from None
        if event["type"] == "frame":
            self.worker.counts["frames"] += 1

    def release(self) -> None:
        """Free the place in the queue, once (on the event loop)."""
        if not self.released:
            self.released = True
            self.worker.admitted -= 1
            self.worker.live.discard(self)

    def close(self) -> None:
        """The response has ended: stop the job at its next step and free its place."""
        self.cancel.set()
        self.release()


def _sse(event: dict) -> str:
    return f"event: {event['type']}\ndata: {json.dumps(event)}\n\n"


class EventStream(StreamingResponse):
    """A text/event-stream that closes its Generation however the response ends: finished,
    client gone (Starlette cancels the stream on http.disconnect) or server stopping."""

    def __init__(self, gen: Generation):
        super().__init__(gen.events(), media_type="text/event-stream",
                         headers={"Cache-Control": "no-store"})
        self.gen = gen

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.gen.close()
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()


async def _read_json(request: Request) -> Any:
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
        raise HTTPException(415, "send the settings as JSON (Content-Type: application/json)")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY:
            raise HTTPException(413, f"the request is larger than {MAX_BODY} bytes")
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        raise BadRequest("the request body is not valid JSON") from None


def create_app(models: dict[str, Path], max_images: int = MAX_IMAGES,
               queue_size: int = QUEUE_SIZE, hosts: tuple[str, ...] = LOOPBACK_NAMES) -> Starlette:
    """The server: the page and its assets, ``/api/models``, ``/api/generate`` (an event stream)
    and ``/api/status``. ``models`` maps the names the page offers to model files; ``hosts`` are
    the host names it answers to (``host_names``), any other Host header is answered 400."""
    if not models:
        raise ValueError("no models to serve")
    if max_images < 1 or queue_size < 0:
        raise ValueError(f"max_images must be >= 1 and queue_size >= 0, got {max_images}, {queue_size}")
    loaded = load_models(models)
    worker = Worker(loaded, queue_size)

    async def index(request: Request) -> FileResponse:
        return FileResponse(WEB_DIR / "index.html", headers={"Cache-Control": "no-store"})

    async def api_models(request: Request) -> JSONResponse:
        return JSONResponse(dict(models=[m.info for m in loaded.values()], samplers=list(SAMPLERS),
                                 # a few-step sampler's cap on steps (the rest: the model's T)
                                 max_steps={k: s.max_steps for k, s in SAMPLERS.items() if s.max_steps},
                                 max_images=max_images, default_sampler=DEFAULT_SAMPLING.sampler,
                                 default_steps=DEFAULT_STEPS, default_eta=DEFAULT_DDIM_ETA,
                                 digits=MNIST_CLASSES, default_guidance=DEFAULT_GUIDANCE))

    async def api_status(request: Request) -> JSONResponse:
        return JSONResponse(worker.status())

    async def api_generate(request: Request) -> EventStream:
        job = parse_job(await _read_json(request), loaded, max_images)
        return EventStream(worker.admit(job))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        yield
        await worker.shutdown()

    app = Starlette(routes=[Route("/", index), Route("/api/models", api_models),
                            Route("/api/status", api_status),
                            Route("/api/generate", api_generate, methods=["POST"]),
                            Mount("/static", StaticFiles(directory=WEB_DIR), name="static")],
                    middleware=[Middleware(OwnHostsOnly, names=hosts)],
                    exception_handlers={BadRequest: _bad_request, HTTPException: _http_error,
                                        ClientDisconnect: _client_gone, Exception: _server_error},
                    lifespan=lifespan)
    app.state.worker = worker
    return app


async def _bad_request(request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"error": str(exc)}, status_code=400)


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    return JSONResponse({"error": exc.detail}, status_code=exc.status_code, headers=exc.headers)


async def _client_gone(request: Request, exc: Exception) -> None:
    """A client that closed its connection while sending its request (the page closed or Stop
    pressed mid-body): nothing was admitted, nobody is left to answer, nothing to log."""
    return None


async def _server_error(request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"error": f"internal error: {type(exc).__name__}"}, status_code=500)


def serve_forever(app: Starlette, sock: socket.socket) -> None:
    """Serve ``app`` on the bound ``sock`` until Ctrl+C or SIGTERM. Running generations are
    cancelled as the signal arrives, so their streams end at once and the server stops cleanly."""
    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            app.state.worker.stop()
            super().handle_exit(sig, frame)
    Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5)).run(sockets=[sock])


def host_name(host: str) -> str:
    """The host of a Host header or an address as typed: lower case, without its port and
    without the brackets of an IPv6 address (``[::1]:8000`` → ``::1``)."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:host.index("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def host_names(listen: str, allowed: list[str] | tuple[str, ...] = ()) -> tuple[str, ...]:
    """The host names a server listening on ``listen`` answers to: the loopback names, the
    listening address itself unless it is a wildcard (0.0.0.0, ::), and the ``allowed`` ones
    (``--allow-host``), in that order, without repeats."""
    names = list(LOOPBACK_NAMES)
    try:
        wildcard = ipaddress.ip_address(host_name(listen)).is_unspecified
    except ValueError:
        wildcard = False
    for name in ([] if wildcard else [listen]) + list(allowed):
        if host_name(name) not in names:
            names.append(host_name(name))
    return tuple(names)


class OwnHostsOnly:
    """ASGI middleware: a request whose Host header names a host outside ``names`` is answered
    400 before any route runs. A page on another site can point its own DNS name at this
    machine's address (DNS rebinding); its requests then still carry its name, so they are
    refused and it can read nothing the server shows."""

    def __init__(self, app, names: tuple[str, ...]):
        self.app, self.names = app, tuple(host_name(n) for n in names)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            header = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
            if host_name(header) not in self.names:
                response = JSONResponse({"error": f"this server answers to {', '.join(self.names)} only, not "
                                                  f"{header!r}; start it with --allow-host NAME to add a name"},
                                        status_code=400)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def is_loopback(host: str) -> bool:
    """Whether the listening address ``host`` is reachable from this machine only: ``localhost``
    or a loopback IP address (127.0.0.0/8, ::1), parsed as an address, not matched as text."""
    name = host_name(host)
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:  # a host name: it may resolve anywhere
        return False

