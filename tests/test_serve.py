"""``minidiff serve``: the page in headless Chromium (Generate fills the grid step by step, every
image decodes, the slider scrubs, Compare, a bad value's message, a conditional model's digit and
guidance), and over plain HTTP the final grid against ``generate`` (with labels and guidance for a
conditional model), the 4xx answers to bad requests, the bounded queue's 503 and the cancellation
of a generation whose client has gone."""
from __future__ import annotations

import base64
import contextlib
import http.client
import importlib.util
import io
import json
import logging
import os
import shutil
import socket
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import uvicorn
from PIL import Image

from minidiff import cli
from minidiff.config import (CONSISTENCY_STEPS, DEFAULT_GUIDANCE, DEFAULT_SAMPLING, DEFAULT_STEPS, MNIST_CLASSES, SAMPLERS,
                             SamplingSpec, train_config)
from minidiff.data import to_uint8
from minidiff.diffusion import make_schedule
from minidiff.generate import generate, grid_image, initial_noise
from minidiff.runtime import default_device
from minidiff.samplers import consistency_grid, run_sampler, timestep_grid
from minidiff.serve import create_app
from minidiff.shipped import available
from minidiff.modelfile import load_model, save_model
from minidiff.models.unet import SimpleUnet

from _support import tiny_model_file, tiny_unet_config


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("serve")
    return {"tiny": tiny_model_file(d / "tiny.safetensors", 0), "tiny-b": tiny_model_file(d / "b.safetensors", 1)}


def tiny_conditional_model_file(path: Path) -> Path:
    """An untrained tiny network conditioned on the ten digits, its label embedding scaled up from
    its init (as tests/test_conditional.py does) so that the digit and w change what it draws."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = SimpleUnet(replace(tiny_unet_config(), num_classes=MNIST_CLASSES))
    with torch.no_grad():
        net.label_emb.weight.mul_(20)
    return save_model(path, net, train_config("smoke", "reduced", MNIST_CLASSES), step=0)


@pytest.fixture(scope="module")
def cond_models(tiny_models, tmp_path_factory) -> dict[str, Path]:
    """An unconditional model and a conditional one."""
    path = tiny_conditional_model_file(tmp_path_factory.mktemp("serve-cond") / "cond.safetensors")
    return {"tiny": tiny_models["tiny"], "cond": path}


@contextlib.contextmanager
def serving(app):
    """Run ``app`` with uvicorn in a thread on a free loopback port; stop it and check it stopped."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
    assert not thread.is_alive(), "the server thread is still running"


@pytest.fixture(scope="module")
def port(tiny_models):
    with serving(create_app(tiny_models, max_images=16, queue_size=2)) as p:
        yield p


def _post(port: int, body, content_type: str = "application/json", timeout: float = 60):
    """POST to /api/generate; returns the open (connection, response)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    conn.request("POST", "/api/generate", data, {"Content-Type": content_type})
    return conn, conn.getresponse()


def _next_event(resp) -> dict:
    """The next server-sent event's JSON."""
    data = []
    while True:
        line = resp.readline()
        assert line, "the stream ended before the next event"
        line = line.decode().rstrip("\n")
        if line.startswith("data: "):
            data.append(line[6:])
        elif line == "" and data:
            return json.loads("\n".join(data))


def _events(port: int, body) -> list[dict]:
    conn, resp = _post(port, body)
    try:
        assert resp.status == 200, resp.read()
        assert resp.getheader("Content-Type").startswith("text/event-stream")
        events = [_next_event(resp)]
        while events[-1]["type"] not in ("end", "error"):
            events.append(_next_event(resp))
        return events
    finally:
        conn.close()


def _get_json(port: int, path: str):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def _decode(data_url: str) -> Image.Image:
    head, b64 = data_url.split(",", 1)
    assert head == "data:image/png;base64"
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def _grid(x: torch.Tensor, nrow: int | None = None) -> bytes:
    return grid_image(to_uint8(x), nrow).tobytes()


def _wait_for(condition, what: str, timeout: float = 30):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_sampler_hands_its_callback_x0_and_the_last_x0_is_the_sample(sampler):
    sched = make_schedule()
    seen, infos = [], []

    def callback(info):
        infos.append({k: v for k, v in info.items() if k in ("step", "steps", "t")})
        seen.append((info["t"], info["x"].clone(), info["x0"].clone()))
    steps = None if sampler == "ddpm" else SAMPLERS[sampler].max_steps or 7  # consistency takes at most 4
    spec = SamplingSpec(sampler, steps)
    x = run_sampler(spec, lambda x, t: 0.3 * x, sched, initial_noise(3, 0), torch.Generator().manual_seed(1),
                    callback=callback)
    ts = (list(range(sched.T - 1, -1, -1)) if sampler == "ddpm" else consistency_grid(sched, steps)
          if sampler == "consistency" else timestep_grid(sched.T, steps))
    assert [t for t, _, _ in seen] == ts
    assert infos == [dict(step=k + 1, steps=len(ts), t=t) for k, t in enumerate(ts)]
    assert torch.equal(seen[-1][1], x)
    assert torch.allclose(seen[-1][2], x, atol=1e-3)  # x̂_0 at t = 0 is the sample (up to float32)
    assert all(x0.abs().max() <= 1 for _, _, x0 in seen)  # clipped, as the sampler used it


def test_generate_tells_its_callback_which_batch_each_step_belongs_to(tiny_models):
    model, sched, _ = load_model(tiny_models["tiny"])
    seen = []
    generate(model, sched, 5, SamplingSpec("ddim", 3, batch_size=2), progress=False,
             callback=lambda info: seen.append((info["batch"], info["step"])))
    assert seen == [(b, k) for b in range(3) for k in (1, 2, 3)]


def test_compare_streams_every_step_from_the_same_noise_and_ends_as_generate(port, tiny_models):
    n, seed = 5, 7
    runs = [{"model": "tiny", "sampler": "ddim", "steps": 4, "eta": 1.0},
            {"model": "tiny-b", "sampler": "dpmpp2m", "steps": 3}]
    events = _events(port, {"seed": seed, "n": n, "runs": runs})
    assert [e["type"] for e in events[:2]] == ["queued", "start"] and events[-1]["type"] == "end"
    starts = [e for e in events if e["type"] == "start"]
    assert [s["x_T"] for s in starts] == [starts[0]["x_T"]] * 2  # one x_T for both runs
    assert _decode(starts[0]["x_T"]).tobytes() == _grid(initial_noise(n, seed))
    for i, (setting, steps) in enumerate(zip(runs, (4, 3))):
        frames = [e for e in events if e["type"] == "frame" and e["run"] == i]
        assert [f["step"] for f in frames] == list(range(1, steps + 1))
        assert [f["t"] for f in frames] == timestep_grid(200, steps)
        assert all(f["ms"] > 0 for f in frames)
        for f in frames:
            assert _decode(f["x_t"]).size == _decode(f["x0"]).size == (92, 62)  # 3 × 2 tiles of 30 px
        model = load_model(tiny_models[setting["model"]], default_device()).model  # where the server samples
        # in the one default precision (fp32), as `minidiff sample` and the page both sample
        x = generate(model, make_schedule(), n, SamplingSpec(setting["sampler"], steps, seed=seed), progress=False)
        assert _decode(frames[-1]["x_t"]).tobytes() == _grid(x)  # what `minidiff sample` draws
        done = next(e for e in events if e["type"] == "done" and e["run"] == i)
        assert done["sampling_s"] == pytest.approx(sum(f["ms"] for f in frames) / 1000)
        assert done["wall_s"] >= done["sampling_s"] > 0
    assert events.index(next(e for e in events if e["type"] == "done")) < events.index(starts[1])


GOOD = {"model": "tiny", "sampler": "ddim", "steps": 3, "eta": 1.0}


@pytest.mark.parametrize("body, status, fragment", [
    ({"seed": 0, "n": 2, "runs": [dict(GOOD, model="nope")]}, 400, 'unknown model "nope"; choose one of tiny, tiny-b'),
    ({"seed": 0, "n": 2, "runs": [dict(GOOD, steps=0)]}, 400, "steps must be in [1, 200], got 0"),
    ({"seed": 0, "n": 2, "runs": [dict(GOOD, steps=201)]}, 400, "steps must be in [1, 200], got 201"),
    ({"seed": 0, "n": 2, "runs": [dict(GOOD, steps="ten")]}, 400, 'steps must be an integer, got "ten"'),
    ({"seed": 0, "n": 2, "runs": [dict(GOOD, steps=2.5)]}, 400, "steps must be an integer, got 2.5"),
    ({"seed": 0, "n": 2, "runs": [dict(GOOD, sampler="ddpm", steps=20, eta=None)]}, 400, "ddpm sampler always runs all 200"),
    ({"seed": 0, "n": 2, "runs": [dict(GOOD, sampler="euler")]}, 400, "unknown sampler 'euler'; choose one of ddpm, ddim, dpmpp2m"),
    ({"seed": 0, "n": 17, "runs": [GOOD]}, 400, "the number of images must be an integer in [1, 16], got 17"),
    ({"seed": 0, "n": 0, "runs": [GOOD]}, 400, "the number of images must be an integer in [1, 16], got 0"),
    ({"seed": -1, "n": 2, "runs": [GOOD]}, 400, "seed must be an integer in [0, 4294967295], got -1"),
    ({"seed": 0, "n": 2, "runs": [dict(GOOD, eta=-0.5)]}, 400, "eta applies to ddim only and must be >= 0 and finite, got -0.5 for ddim"),
    (b'{"seed": 0, "n": 2, "runs": [{"model": "tiny", "sampler": "ddim", "steps": 3, "eta": NaN}]}', 400,
     "eta applies to ddim only and must be >= 0 and finite, got nan for ddim"),
    (b'{"seed": 0, "n": 2, "runs": [{"model": "tiny", "sampler": "ddim", "steps": 3, "eta": 1e999}]}', 400,
     "eta applies to ddim only and must be >= 0 and finite, got inf for ddim"),
    ({"seed": 0, "n": 2, "runs": [dict(GOOD, eta="1")]}, 400, 'eta must be a number, got "1"'),
    ({"seed": 0, "n": 2, "runs": [dict(GOOD, eta=1e308)]}, 400,
     "eta must be in [0, 1] (0 deterministic, 1 DDPM's variance), got 1e+308"),
    ({"seed": 0, "n": 2, "runs": [dict(GOOD, sampler="dpmpp2m")]}, 400, "eta applies to ddim only and must be >= 0 and finite, got 1.0 for dpmpp2m"),
    ({"seed": 0, "n": 2, "runs": [GOOD] * 3}, 400, "runs must be a list of one setting (Generate) or two"),
    ({"seed": 0, "n": 2, "runs": [GOOD], "batch": 9}, 400, "unknown field(s) batch"),
    ({"seed": 0, "n": 2, "runs": ["tiny"]}, 400, "each run must be a JSON object"),
    ([GOOD], 400, "the request must be a JSON object"),
    (b'{"seed": 0, "n": ', 400, "the request body is not valid JSON"),
    (b"[" * 100_000, 413, "the request is larger than 16384 bytes"),
])
def test_a_bad_request_is_a_4xx_with_a_message_and_runs_nothing(port, body, status, fragment):
    _assert_refused(port, body, status, fragment)


def _assert_refused(port: int, body, status: int, fragment: str) -> None:
    """``body`` is answered ``status`` with a one-line JSON error holding ``fragment``, and nothing
    was queued or sampled."""
    before = _get_json(port, "/api/status")[1]
    conn, resp = _post(port, body)
    try:
        assert resp.status == status
        assert resp.getheader("Content-Type") == "application/json"
        error = json.loads(resp.read())["error"]
        assert fragment in error and "\n" not in error, error
    finally:
        conn.close()
    assert _get_json(port, "/api/status")[1] == before  # nothing was queued or sampled


def test_other_mistakes_are_json_errors_too(port, tiny_models):
    conn, resp = _post(port, json.dumps({"seed": 0, "n": 1, "runs": [GOOD]}).encode(), "text/plain")
    assert (resp.status, json.loads(resp.read())["error"]) == (
        415, "send the settings as JSON (Content-Type: application/json)")
    conn.close()
    assert _get_json(port, "/api/generate") == (405, {"error": "Method Not Allowed"})
    assert _get_json(port, "/nothing/here") == (404, {"error": "Not Found"})
    status, info = _get_json(port, "/api/models")
    assert status == 200 and [m["name"] for m in info["models"]] == ["tiny", "tiny-b"]
    params = sum(p.numel() for p in load_model(tiny_models["tiny"]).model.parameters())
    assert info["max_images"] == 16 and info["models"][0]["params"] == params < 100_000
    assert info["max_steps"] == {"consistency": 4}  # the page's steps field offers no more


def test_the_page_and_its_assets_come_from_the_package(port):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    for path, kind in (("/", "text/html"), ("/static/app.js", "javascript"), ("/static/style.css", "text/css")):
        conn.request("GET", path)
        resp = conn.getresponse()
        text = resp.read().decode()
        assert resp.status == 200 and kind in resp.getheader("Content-Type")
        assert "http://" not in text and "https://" not in text and "//cdn" not in text  # nothing from elsewhere
    conn.close()


def test_a_finished_generation_is_counted_before_its_end_event_reaches_the_client(tiny_models, monkeypatch):
    """The sampling thread may be descheduled right after it sends the last event (a busy CPU):
    /api/status must already count the generation as finished when the client has read "end"."""
    from minidiff import serve
    real = serve.sample_job

    def descheduled_after_the_last_event(*args):
        real(*args)
        time.sleep(1.0)
    monkeypatch.setattr(serve, "sample_job", descheduled_after_the_last_event)
    with serving(create_app(tiny_models)) as p:
        short = {"seed": 0, "n": 1, "runs": [{"model": "tiny", "sampler": "ddim", "steps": 2}]}
        assert _events(p, short)[-1] == {"type": "end"}
        status = _get_json(p, "/api/status")[1]
        assert (status["finished"], status["cancelled"]) == (1, 0)


def test_a_full_queue_answers_503_and_a_client_that_leaves_cancels_its_generation(tiny_models):
    # One running + one waiting at most. 64 images × 200 ddpm steps of frames (~26 MB) cannot all
    # fit in socket buffers, so a generation whose client stops reading stays running.
    long = {"seed": 0, "n": 64, "runs": [{"model": "tiny", "sampler": "ddpm"}]}
    with serving(create_app(tiny_models, max_images=64, queue_size=1)) as p:
        conn_a, a = _post(p, long)
        assert _next_event(a) == {"type": "queued", "ahead": 0} and _next_event(a)["type"] == "start"
        assert _next_event(a)["step"] == 1
        conn_b, b = _post(p, long)
        assert _next_event(b) == {"type": "queued", "ahead": 1}
        status = _get_json(p, "/api/status")[1]
        assert (status["running"], status["waiting"]) == (1, 1)

        conn_c, c = _post(p, long)
        assert c.status == 503
        assert json.loads(c.read())["error"].startswith("busy: 2 generations are running or waiting")
        conn_c.close()

        conn_a.close()  # the page closed: A stops between two steps, B starts
        assert _next_event(b)["type"] == "start"
        _wait_for(lambda: _get_json(p, "/api/status")[1]["cancelled"] == 1, "A's cancellation")
        conn_b.close()
        _wait_for(lambda: _get_json(p, "/api/status")[1]["cancelled"] == 2, "B's cancellation")
        status = _get_json(p, "/api/status")[1]
        assert (status["running"], status["waiting"], status["finished"]) == (0, 0, 0)
        time.sleep(0.5)
        assert _get_json(p, "/api/status")[1]["frames"] == status["frames"] < 2 * 200  # no step since

        short = {"seed": 0, "n": 1, "runs": [{"model": "tiny", "sampler": "ddim", "steps": 2}]}
        assert _events(p, short)[-1] == {"type": "end"}  # the queue is free again
        assert _get_json(p, "/api/status")[1]["finished"] == 1


@pytest.mark.slow
def test_a_client_that_stops_reading_loses_its_generation_and_frees_the_worker(tiny_models, monkeypatch):
    from minidiff import serve
    monkeypatch.setattr(serve, "STALL_S", 0.5)
    long = {"seed": 0, "n": 64, "runs": [{"model": "tiny", "sampler": "ddpm"}]}
    with serving(create_app(tiny_models, max_images=64, queue_size=0)) as p:
        conn, stalled = _post(p, long)  # connected, but reads no further than the headers
        _wait_for(lambda: _get_json(p, "/api/status")[1]["cancelled"] == 1, "the stalled job's end")
        status = _get_json(p, "/api/status")[1]
        assert (status["running"], status["waiting"], status["finished"]) == (0, 0, 0)
        assert status["frames"] < 200
        short = {"seed": 0, "n": 1, "runs": [{"model": "tiny", "sampler": "ddim", "steps": 2}]}
        assert _events(p, short)[-1] == {"type": "end"}  # queue_size 0: only possible once it left
        conn.close()


def test_serve_command_errors_are_one_line_exit_2(tiny_models, tmp_path, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = cli.main(["serve", str(tiny_models["tiny"]), "--port", str(port)])
        err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith(f"minidiff: error: cannot listen on 127.0.0.1:{port}: ")
    assert err.strip().endswith("choose another with --port")
    assert cli.main(["serve", str(tmp_path / "missing.safetensors")]) == 2
    assert "no such checkpoint file" in capsys.readouterr().err
    assert cli.main(["serve", str(tiny_models["tiny"]), "--port", "70000"]) == 2
    assert capsys.readouterr().err.strip() == "minidiff: error: --port must be in [0, 65535], got 70000"


# --- conditional models: a digit and a guidance weight ----------------------------------------

@pytest.fixture(scope="module")
def cond_port(cond_models):
    with serving(create_app(cond_models, max_images=32, queue_size=2)) as p:
        yield p


def _final(events: list[dict], run: int) -> bytes:
    """The pixels of a run's last x_t grid: its sample."""
    return _decode([e for e in events if e["type"] == "frame" and e["run"] == run][-1]["x_t"]).tobytes()


def _drawn(path: Path, n: int, seed: int, steps: int, labels=None, guidance=None) -> torch.Tensor:
    """What ``generate`` draws with DDIM at ``steps`` (default η, fp32) where the server samples."""
    model = load_model(path, default_device()).model
    return generate(model, make_schedule(), n, SamplingSpec("ddim", steps, seed=seed), progress=False,
                    labels=None if labels is None else torch.tensor(labels), guidance=guidance)


def test_the_model_list_marks_conditional_models(cond_port):
    status, info = _get_json(cond_port, "/api/models")
    assert status == 200
    assert [(m["name"], m["conditional"]) for m in info["models"]] == [("tiny", False), ("cond", True)]
    assert (info["digits"], info["default_guidance"]) == (MNIST_CLASSES, DEFAULT_GUIDANCE)


@pytest.mark.parametrize("extra, digit, w", [
    ({"digit": 3, "guidance": 1.5}, 3, 1.5),
    ({"digit": 0, "guidance": 0}, 0, 0.0),        # w = 0: the unconditional ε
    ({"digit": 9, "guidance": 1}, 9, 1.0),        # w = 1: the plain conditional ε
    ({"digit": 3}, 3, DEFAULT_GUIDANCE),          # as `minidiff sample --digit 3` draws
    ({}, None, None),                             # no digit: drawn unconditionally
])
def test_a_conditional_request_ends_as_generate_with_its_labels_and_guidance(cond_port, cond_models, extra, digit, w):
    n, seed, steps = 5, 11, 3
    events = _events(cond_port, {"seed": seed, "n": n, "runs": [dict(model="cond", sampler="ddim", steps=steps,
                                                                      **extra)]})
    start = next(e for e in events if e["type"] == "start")
    assert (start["setting"]["digit"], start["setting"]["guidance"]) == (digit, w)
    x = _drawn(cond_models["cond"], n, seed, steps, None if digit is None else [digit] * n, w)
    assert _final(events, 0) == _grid(x)  # exactly, in fp32: the same digits from the same seed
    if digit is not None and w != 0:
        assert _final(events, 0) != _grid(_drawn(cond_models["cond"], n, seed, steps, [(digit + 1) % 10] * n, w))


def test_all_digits_draws_ten_rows_as_minidiff_sample_does_and_compare_keeps_the_rows(cond_port, cond_models,
                                                                                      tmp_path, capsys):
    n, seed, steps = 12, 3, 2  # all: rounded up to 2 of each digit, 20 images in ten rows of 2
    runs = [{"model": "cond", "sampler": "ddim", "steps": steps, "digit": "all", "guidance": 2.5},
            {"model": "tiny", "sampler": "ddim", "steps": steps}]
    events = _events(cond_port, {"seed": seed, "n": n, "runs": runs})
    starts = [e for e in events if e["type"] == "start"]
    assert starts[0]["x_T"] == starts[1]["x_T"]
    assert _decode(starts[0]["x_T"]).tobytes() == _grid(initial_noise(20, seed), 2)
    for e in events:
        if e["type"] == "frame":
            assert _decode(e["x_t"]).size == _decode(e["x0"]).size == (2 * 30 + 2, 10 * 30 + 2)
    argv = ["sample", cond_models["cond"], "--digit", "all", "-n", n, "--guidance", 2.5, "--seed", seed,
            "--steps", steps, "--out", tmp_path / "all.png"]
    assert cli.main([str(a) for a in argv]) == 0, capsys.readouterr().err
    with Image.open(tmp_path / "all.png") as written:
        assert _final(events, 0) == written.tobytes()  # the very grid `minidiff sample` writes
    # the unconditional run beside it draws as many from the same x_T, in the same rows
    assert _final(events, 1) == _grid(_drawn(cond_models["tiny"], 20, seed, steps), 2)


def test_compare_puts_two_guidance_weights_side_by_side_from_the_same_noise(cond_port, cond_models):
    n, seed, steps = 4, 5, 3
    runs = [{"model": "cond", "sampler": "ddim", "steps": steps, "digit": 7, "guidance": w} for w in (0, 4)]
    events = _events(cond_port, {"seed": seed, "n": n, "runs": runs})
    starts = [e for e in events if e["type"] == "start"]
    assert [s["setting"]["guidance"] for s in starts] == [0.0, 4.0]
    assert starts[0]["x_T"] == starts[1]["x_T"]  # one x_T for both runs
    assert _decode(starts[0]["x_T"]).tobytes() == _grid(initial_noise(n, seed))
    for i, w in enumerate((0, 4)):
        assert _final(events, i) == _grid(_drawn(cond_models["cond"], n, seed, steps, [7] * n, w))
    assert _final(events, 0) != _final(events, 1)


COND_GOOD = {"model": "cond", "sampler": "ddim", "steps": 3}


@pytest.mark.parametrize("run, n, fragment", [
    (dict(GOOD, digit=3), 2, 'model "tiny" is unconditional (trained without labels): it takes no digit and no guidance'),
    (dict(GOOD, guidance=2), 2, 'model "tiny" is unconditional'),
    (dict(GOOD, digit="all", guidance=0), 2, 'model "tiny" is unconditional'),
    (dict(COND_GOOD, digit=10), 2, 'digit must be a digit 0–9 or "all", got 10'),
    (dict(COND_GOOD, digit=-1), 2, 'digit must be a digit 0–9 or "all", got -1'),
    (dict(COND_GOOD, digit="seven"), 2, 'digit must be a digit 0–9 or "all", got "seven"'),
    (dict(COND_GOOD, digit="3"), 2, 'digit must be a digit 0–9 or "all", got "3"'),
    (dict(COND_GOOD, digit=3.0), 2, 'digit must be a digit 0–9 or "all", got 3.0'),
    (dict(COND_GOOD, digit=True), 2, 'digit must be a digit 0–9 or "all", got true'),
    (dict(COND_GOOD, digit=[3]), 2, 'digit must be a digit 0–9 or "all", got [3]'),
    (dict(COND_GOOD, digit=3, guidance=-1), 2, "guidance must be a finite number >= 0, got -1"),
    (dict(COND_GOOD, digit=3, guidance=-0.5), 2, "guidance must be a finite number >= 0, got -0.5"),
    (b'{"model": "cond", "digit": 3, "guidance": NaN}', 2, "guidance must be a finite number >= 0, got nan"),
    (b'{"model": "cond", "digit": 3, "guidance": Infinity}', 2, "guidance must be a finite number >= 0, got inf"),
    (b'{"model": "cond", "digit": 3, "guidance": 1e999}', 2, "guidance must be a finite number >= 0, got inf"),
    (dict(COND_GOOD, digit=3, guidance="2"), 2, 'guidance must be a number, got "2"'),
    (dict(COND_GOOD, digit=3, guidance=False), 2, "guidance must be a number, got false"),
    (dict(COND_GOOD, guidance=2), 2, "guidance needs a digit: without one a conditional model draws unconditionally"),
    (dict(COND_GOOD, digit="all"), 31, 'digit "all" rounds the number of images up to a multiple of 10, 40 here, '
                                      "more than the 32 a request may draw"),
])
def test_a_bad_digit_or_guidance_is_a_400_with_a_one_line_message(cond_port, run, n, fragment):
    runs = run.decode() if isinstance(run, bytes) else json.dumps(run)
    _assert_refused(cond_port, f'{{"seed": 0, "n": {n}, "runs": [{runs}]}}'.encode(), 400, fragment)


# --- whom the server answers --------------------------------------------------------------------

def _get(port: int, path: str, host: str | None):
    """GET with this Host header (None: none at all); returns (status, JSON body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.putrequest("GET", path, skip_host=True)
        if host is not None:
            conn.putheader("Host", host)
        conn.endheaders()
        resp = conn.getresponse()
        body = resp.read()
        return resp.status, json.loads(body) if resp.getheader("Content-Type") == "application/json" else body
    finally:
        conn.close()


@pytest.mark.parametrize("host", ["evil.example", "evil.example:{port}", "127.evil.example", "localhost.evil.example",
                                  "[::2]:{port}", "0.0.0.0:{port}", "", None])
def test_a_request_naming_another_host_is_answered_400_and_runs_nothing(port, host):
    """A page on another site whose DNS name is rebound to 127.0.0.1 sends its own name as Host."""
    header = None if host is None else host.format(port=port)
    before = _get_json(port, "/api/status")[1]
    for path in ("/api/models", "/api/status", "/", "/static/app.js"):
        status, body = _get(port, path, header)
        assert status == 400, (path, body)
        if header is None:  # HTTP/1.1 requires a Host header: uvicorn answers 400 itself
            continue
        assert "this server answers to localhost, 127.0.0.1, ::1 only" in body["error"]
        assert "--allow-host" in body["error"]
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.putrequest("POST", "/api/generate", skip_host=True)
    for k, v in (("Host", header or "x"), ("Content-Type", "application/json")):
        conn.putheader(k, v)
    body = json.dumps({"seed": 0, "n": 1, "runs": [GOOD]}).encode()
    conn.putheader("Content-Length", str(len(body)))
    conn.endheaders(body)
    assert conn.getresponse().status == 400
    conn.close()
    assert _get_json(port, "/api/status")[1] == before  # nothing was queued or sampled


@pytest.mark.parametrize("host", ["127.0.0.1:{port}", "localhost:{port}", "LOCALHOST:{port}", "[::1]:{port}",
                                  "127.0.0.1", "localhost"])
def test_its_own_host_names_are_answered(port, host):
    status, body = _get(port, "/api/models", host.format(port=port))
    assert status == 200 and [m["name"] for m in body["models"]] == ["tiny", "tiny-b"]


def test_allow_host_adds_names_and_the_listening_address_is_one(tiny_models):
    from minidiff.serve import host_names
    assert host_names("127.0.0.1", []) == ("localhost", "127.0.0.1", "::1")
    assert host_names("0.0.0.0", ["Digits.LAN"]) == ("localhost", "127.0.0.1", "::1", "digits.lan")
    assert host_names("192.168.1.5", ["[fe80::1]"]) == ("localhost", "127.0.0.1", "::1", "192.168.1.5", "fe80::1")
    with serving(create_app(tiny_models, hosts=host_names("0.0.0.0", ["digits.lan"]))) as p:
        assert _get(p, "/api/models", f"digits.lan:{p}")[0] == 200
        assert _get(p, "/api/models", f"localhost:{p}")[0] == 200
        assert _get(p, "/api/models", f"other.lan:{p}")[0] == 400
    assert cli._parser().parse_args(["serve", "--allow-host", "a", "--allow-host", "b"]).allow_host == ["a", "b"]


def test_the_model_list_shows_names_not_file_paths(port, tiny_models):
    status, info = _get_json(port, "/api/models")
    assert status == 200
    text = json.dumps(info)
    assert str(tiny_models["tiny"].parent) not in text and "/" not in text.replace("\\/", "")
    assert [(m["name"], m["file"]) for m in info["models"]] == [("tiny", "tiny.safetensors"), ("tiny-b", "b.safetensors")]
    assert all(set(m) == {"name", "file", "arch", "T", "params", "precision", "conditional", "sampler", "steps"}
               for m in info["models"])
    # what the page reads of each model (web/app.js): name, arch, params and T
    js = (Path(__file__).parents[1] / "src/minidiff/web/app.js").read_text()
    assert "m.path" not in js and ".path" not in js


@pytest.mark.parametrize("host, loopback", [
    ("127.0.0.1", True), ("127.1.2.3", True), ("::1", True), ("[::1]", True), ("localhost", True),
    ("LocalHost", True), ("127.evil.example", False), ("127.0.0.1.evil.example", False), ("0.0.0.0", False),
    ("::", False), ("192.168.1.5", False), ("example.com", False), ("", False)])
def test_is_loopback_parses_the_address(host, loopback):
    from minidiff.serve import is_loopback
    assert is_loopback(host) is loopback


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


def test_a_client_that_closes_mid_body_is_a_quiet_cancellation(tiny_models):
    with serving(create_app(tiny_models, queue_size=0)) as p:
        records = _Records()
        log = logging.getLogger("uvicorn.error")  # where uvicorn writes an application's traceback
        log.addHandler(records)
        try:
            with socket.create_connection(("127.0.0.1", p)) as s:
                s.sendall(b"POST /api/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                          b"Content-Length: 1000\r\n\r\n{\"seed\": 0, ")  # 12 of the 1000 bytes, then gone
                time.sleep(0.2)
            deadline = time.monotonic() + 2
            while time.monotonic() < deadline and not records.records:
                time.sleep(0.05)
        finally:
            log.removeHandler(records)
        assert [r.getMessage() for r in records.records if r.levelno >= logging.WARNING] == []
        assert not any(r.exc_info for r in records.records)
        status = _get_json(p, "/api/status")[1]
        assert (status["running"], status["waiting"], status["failed"]) == (0, 0, 0)
        short = {"seed": 0, "n": 1, "runs": [{"model": "tiny", "sampler": "ddim", "steps": 2}]}
        assert _events(p, short)[-1] == {"type": "end"}  # the server serves on


# --- the page in headless Chromium ---------------------------------------------------------------

def _browser() -> tuple[str, str]:
    """Chromium and its driver, or a skip (a failure under MINIDIFF_REQUIRE_CHROMIUM=1, as in CI)."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver") if importlib.util.find_spec("selenium") else None
    if None in (chromium, driver):
        missing = "chromium" if chromium is None else "chromedriver and selenium"
        if os.environ.get("MINIDIFF_REQUIRE_CHROMIUM") == "1":
            pytest.fail(f"{missing} required here (MINIDIFF_REQUIRE_CHROMIUM=1) but not installed")
        pytest.skip(f"{missing} not installed (`make test` installs chromium and chromium-driver "
                    "where apt-get is available)")
    return chromium, driver


@pytest.fixture
def browser(tmp_path, monkeypatch):
    chromium, driver_path = _browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager must not look for drivers online
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1200,920", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=opts)
    try:
        yield driver
    finally:
        driver.quit()


def _page_models(tiny_models) -> dict[str, Path]:
    """The tiny models; for the README's screenshot (MINIDIFF_SCREENSHOT) the shipped reduced
    model, whose digits are real and whose 16 × 20 steps take about a second."""
    if os.environ.get("MINIDIFF_SCREENSHOT") and "reduced" in available():
        return {"reduced": available()["reduced"]}
    return tiny_models


@pytest.mark.slow
def test_the_page_generates_live_scrubs_and_compares_in_headless_chromium(browser, tiny_models, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait
    wait = WebDriverWait(browser, 60)
    models = _page_models(tiny_models)
    with serving(create_app(models, max_images=64, queue_size=1)) as p:
        browser.get(f"http://127.0.0.1:{p}/")
        wait.until(lambda d: d.execute_script("return document.body.dataset.ready === 'true'"))
        model_a = browser.find_element(By.CSS_SELECTOR, "#setting-a [name=model]")
        assert model_a.get_attribute("value") == next(iter(models))

        # a bad value: the server's message on the page, nothing drawn
        n = browser.find_element(By.ID, "n")
        n.clear()
        n.send_keys("65")
        browser.find_element(By.ID, "generate").click()
        wait.until(lambda d: d.find_element(By.ID, "message").is_displayed())
        message = browser.find_element(By.ID, "message")
        assert message.text == "the number of images must be an integer in [1, 64], got 65"
        assert "error" in message.get_attribute("class") and not browser.find_elements(By.CSS_SELECTOR, ".run")

        # Generate: the grid fills in step by step, then the slider scrubs through the steps
        n.clear()
        n.send_keys("16")
        browser.execute_script(  # every picture x_t shows while it runs, in order
            "window.shown = []; new MutationObserver(records => records.forEach(r => "
            "r.target.matches('img.xt') && shown.push(r.target.getAttribute('src')))).observe("
            "document.getElementById('runs'), {subtree: true, attributeFilter: ['src']})")
        browser.find_element(By.ID, "generate").click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".run[data-state=done]"))
        steps = int(browser.find_element(By.CSS_SELECTOR, "#setting-a [name=steps]").get_attribute("value"))
        shown = browser.execute_script("return shown")
        assert len(shown) == steps and len(set(shown)) > steps // 2  # a new grid after every step
        run = browser.find_element(By.CSS_SELECTOR, ".run")
        assert run.find_element(By.CSS_SELECTOR, "progress").get_attribute("value") == str(steps)
        assert run.find_element(By.CSS_SELECTOR, ".status").text.startswith(f"step {steps}/{steps} · t = 0 · ")
        assert run.find_element(By.CSS_SELECTOR, ".time").text.startswith("sampling ")
        sizes = browser.execute_script(
            "return [...document.querySelectorAll('.run img')].map(i => [i.complete, i.naturalWidth, i.naturalHeight])")
        assert sizes == [[True, 122, 122]] * 2  # 4 × 4 tiles of 30 px, x_t and x̂_0, both decoded
        final = run.find_element(By.CSS_SELECTOR, "img.xt").get_attribute("src")
        assert _decode(final).size == (122, 122)
        slider = run.find_element(By.CSS_SELECTOR, "input[type=range]")
        assert slider.is_enabled() and slider.get_attribute("max") == str(steps)
        slider.send_keys(Keys.HOME)
        assert run.find_element(By.CSS_SELECTOR, "output").text == f"0 / {steps}"
        noise = run.find_element(By.CSS_SELECTOR, "img.xt").get_attribute("src")
        assert noise != final and "initial noise" in run.find_element(By.CSS_SELECTOR, ".xt-caption").text
        assert _decode(noise).tobytes() == _grid(initial_noise(16, 0))
        slider.send_keys(Keys.ARROW_RIGHT)
        middle = run.find_element(By.CSS_SELECTOR, "img.xt").get_attribute("src")
        assert middle not in (noise, final)
        assert run.find_element(By.CSS_SELECTOR, ".status").text.startswith(f"step 1/{steps} · ")

        # Compare: A and B side by side from the same x_T, each with its time
        browser.find_element(By.ID, "compare").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".run[data-state=done]")) == 2)
        panels = browser.find_elements(By.CSS_SELECTOR, ".run")
        assert all(panel.find_element(By.CSS_SELECTOR, ".time").text.startswith("sampling ") for panel in panels)
        assert browser.execute_script("return [...document.querySelectorAll('.run img')]"
                                      ".every(i => i.complete && i.naturalWidth > 0)")
        titles = [panel.find_element(By.CSS_SELECTOR, "h2").text for panel in panels]
        assert titles[0] != titles[1]
        first_frames = browser.execute_script("return [...document.querySelectorAll('.run')].map(r => r.frames[0].xt)")
        assert first_frames[0] == first_frames[1] == noise
        slider = panels[0].find_element(By.CSS_SELECTOR, "input[type=range]")  # A a quarter of the way
        slider.send_keys(Keys.HOME, *[Keys.ARROW_RIGHT] * (steps // 4))
        assert panels[0].find_element(By.CSS_SELECTOR, "output").text == f"{steps // 4} / {steps}"

        shot = Path(os.environ.get("MINIDIFF_SCREENSHOT") or tmp_path / "serve.png")
        shot.parent.mkdir(parents=True, exist_ok=True)
        assert browser.save_screenshot(str(shot))
        with Image.open(shot) as image:
            assert image.size == tuple(browser.execute_script("return [innerWidth, innerHeight]"))


@contextlib.contextmanager
def _open_page(browser, models: dict[str, Path], max_images: int):
    """Serve ``models`` (one generation at a time, one waiting) and load the page in ``browser``
    until its script says it is ready; yields the port."""
    from selenium.webdriver.support.ui import WebDriverWait
    with serving(create_app(models, max_images=max_images, queue_size=1)) as p:
        browser.get(f"http://127.0.0.1:{p}/")
        WebDriverWait(browser, 60).until(lambda d: d.execute_script("return document.body.dataset.ready === 'true'"))
        yield p


@pytest.mark.slow
def test_the_page_draws_a_chosen_digit_at_a_chosen_guidance_in_headless_chromium(browser, cond_models):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select, WebDriverWait
    wait = WebDriverWait(browser, 60)
    with _open_page(browser, cond_models, max_images=64):
        a, b = browser.find_element(By.ID, "setting-a"), browser.find_element(By.ID, "setting-b")
        digit, guidance = a.find_element(By.NAME, "digit"), a.find_element(By.NAME, "guidance")
        # an unconditional model: no digit picker, no guidance slider
        assert a.find_element(By.NAME, "model").get_attribute("value") == "tiny"
        assert not digit.is_displayed() and not guidance.is_displayed() and not digit.is_enabled()

        Select(a.find_element(By.NAME, "model")).select_by_value("cond")
        assert digit.is_displayed() and guidance.is_displayed() and guidance.is_enabled()
        assert [o.get_attribute("value") for o in Select(digit).options] == ["all"] + [str(d) for d in range(10)]
        assert (digit.get_attribute("value"), float(guidance.get_attribute("value"))) == ("all", DEFAULT_GUIDANCE)
        guidance.send_keys(Keys.HOME, *[Keys.ARROW_RIGHT] * 15)  # steps of 0.1
        assert guidance.get_attribute("value") == a.find_element(By.CSS_SELECTOR, ".guidance output").text == "1.5"

        # Generate, all digits at w = 1.5: 16 images rounded up to 2 of each digit, ten rows of 2
        browser.find_element(By.ID, "generate").click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".run[data-state=done]"))
        steps = int(a.find_element(By.NAME, "steps").get_attribute("value"))
        run = browser.find_element(By.CSS_SELECTOR, ".run")
        assert run.find_element(By.CSS_SELECTOR, "h2").text.endswith("· all digits, w = 1.5")
        final = run.find_element(By.CSS_SELECTOR, "img.xt").get_attribute("src")
        assert browser.execute_script("const i = document.querySelector('.run img.xt'); "
                                      "return [i.complete, i.naturalWidth, i.naturalHeight]") == [True, 62, 302]
        labels = torch.arange(10).repeat_interleave(2).tolist()
        assert _decode(final).tobytes() == _grid(_drawn(cond_models["cond"], 20, 0, steps, labels, 1.5), 2)

        # Compare: digit 7 at w = 0 (A) and at w = 5 (B), from the same noise
        Select(digit).select_by_value("7")
        guidance.send_keys(Keys.HOME)
        assert b.find_element(By.NAME, "model").get_attribute("value") == "cond"  # the second model
        Select(b.find_element(By.NAME, "digit")).select_by_value("7")
        b.find_element(By.NAME, "guidance").send_keys(Keys.END)
        b_steps = int(b.find_element(By.NAME, "steps").get_attribute("value"))
        browser.find_element(By.ID, "compare").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".run[data-state=done]")) == 2)
        panels = browser.find_elements(By.CSS_SELECTOR, ".run")
        assert [panel.find_element(By.CSS_SELECTOR, "h2").text.split(" · ")[-1] for panel in panels] == [
            "digit 7, w = 0", "digit 7, w = 5"]
        first_frames = browser.execute_script("return [...document.querySelectorAll('.run')].map(r => r.frames[0].xt)")
        assert first_frames[0] == first_frames[1]
        finals = [panel.find_element(By.CSS_SELECTOR, "img.xt").get_attribute("src") for panel in panels]
        for final, k, w in zip(finals, (steps, b_steps), (0, 5)):
            assert _decode(final).tobytes() == _grid(_drawn(cond_models["cond"], 16, 0, k, [7] * 16, w))
        assert finals[0] != finals[1]


# ---------------------------------------------------------------- a consistency student brings its own sampler
@pytest.fixture(scope="module")
def student_models(tiny_models, tmp_path_factory) -> dict[str, Path]:
    """An ordinary model and a (tiny, untrained) consistency student: a file whose config says
    objective consistency, which ``minidiff sample`` draws with its own sampler at 2 steps."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(2)
        net = SimpleUnet(tiny_unet_config())
    cfg = train_config("smoke", "reduced", objective="consistency", teacher="baseline")
    path = save_model(tmp_path_factory.mktemp("serve-student") / "student.safetensors", net, cfg, step=0)
    return {"tiny": tiny_models["tiny"], "student": path}


def test_a_student_is_listed_with_its_own_sampler_and_drawn_with_it_when_none_is_asked(student_models):
    with serving(create_app(student_models, max_images=16, queue_size=1)) as p:
        status, info = _get_json(p, "/api/models")
        assert status == 200
        assert [(m["name"], m["sampler"], m["steps"]) for m in info["models"]] == [
            ("tiny", DEFAULT_SAMPLING.sampler, DEFAULT_STEPS), ("student", "consistency", CONSISTENCY_STEPS)]
        events = _events(p, {"seed": 3, "n": 4, "runs": [{"model": "student"}, {"model": "tiny", "steps": 2}]})
    start = [e for e in events if e["type"] == "start"]
    assert [(e["setting"]["sampler"], e["steps"]) for e in start] == [("consistency", CONSISTENCY_STEPS), ("ddim", 2)]
    model = load_model(student_models["student"], default_device()).model
    want = generate(model, make_schedule(), 4, SamplingSpec("consistency", CONSISTENCY_STEPS, seed=3), progress=False)
    assert _final(events, 0) == _grid(want)  # what `minidiff sample student -n 4 --seed 3` draws


@pytest.mark.slow
def test_the_page_switches_to_a_students_own_sampler_and_back_in_headless_chromium(browser, student_models):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait
    wait = WebDriverWait(browser, 60)
    with _open_page(browser, student_models, max_images=16):
        a = browser.find_element(By.ID, "setting-a")
        sampler, steps = Select(a.find_element(By.NAME, "sampler")), a.find_element(By.NAME, "steps")

        def shown():
            return sampler.first_selected_option.get_attribute("value"), int(steps.get_attribute("value"))
        assert shown() == (DEFAULT_SAMPLING.sampler, DEFAULT_STEPS)
        # Compare's B is the student from the start, at its own sampling
        b = browser.find_element(By.ID, "setting-b")
        assert Select(b.find_element(By.NAME, "sampler")).first_selected_option.get_attribute("value") == "consistency"
        Select(a.find_element(By.NAME, "model")).select_by_value("student")
        assert shown() == ("consistency", CONSISTENCY_STEPS)
        assert steps.get_attribute("max") == str(SAMPLERS["consistency"].max_steps)  # the field offers 1 to 4
        browser.find_element(By.ID, "generate").click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".run[data-state=done]"))
        frames = browser.execute_script("return document.querySelector('.run').frames.length")
        assert frames == 1 + CONSISTENCY_STEPS  # x_T, then one frame per network evaluation
        Select(a.find_element(By.NAME, "model")).select_by_value("tiny")
        assert shown() == (DEFAULT_SAMPLING.sampler, DEFAULT_STEPS)
