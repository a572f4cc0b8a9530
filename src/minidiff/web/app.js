// minidiff serve: the page. It asks /api/generate for one run (Generate) or two from the same
// noise (Compare) and draws the event stream as it arrives; the server checks every value.
// A conditional model's setting adds a digit (0–9 or all) and a guidance weight w.
"use strict";

const $ = (selector, root = document) => root.querySelector(selector);
let config = null;      // /api/models: models, samplers, bounds, defaults
let controller = null;  // aborts the running request: Stop, a new request, or leaving the page

function showMessage(text, isError = false) {
  const el = $("#message");
  el.textContent = text;
  el.classList.toggle("error", isError);
  el.hidden = !text;
}

function modelInfo(name) {
  return config.models.find(m => m.name === name);
}

// η belongs to DDIM; DDPM always runs all T steps of the model's schedule; a few-step sampler
// (consistency) takes at most its own number.
function syncSetting(fs) {
  const sampler = $("[name=sampler]", fs).value;
  const steps = $("[name=steps]", fs);
  const T = modelInfo($("[name=model]", fs).value).T;
  steps.max = Math.min(T, config.max_steps[sampler] ?? T);
  steps.disabled = sampler === "ddpm";
  if (sampler === "ddpm") steps.value = T;
  $("[name=eta]", fs).disabled = sampler !== "ddim";
  // a digit and a guidance weight belong to a conditional model: hidden and not sent otherwise
  const conditional = modelInfo($("[name=model]", fs).value).conditional;
  for (const label of fs.querySelectorAll(".conditional")) label.hidden = !conditional;
  $("[name=digit]", fs).disabled = $("[name=guidance]", fs).disabled = !conditional;
  $(".guidance output", fs).textContent = $("[name=guidance]", fs).value;
}

// The chosen model's own sampler and steps (/api/models: a consistency student's, the default for the rest).
function ownSampling(fs) {
  const m = modelInfo($("[name=model]", fs).value);
  $("[name=sampler]", fs).value = m.sampler;
  $("[name=steps]", fs).value = m.steps;
}

// A number where the field holds one; otherwise the text itself, for the server to refuse by name.
function fieldValue(input) {
  const text = input.value.trim();
  const v = Number(text);
  return text !== "" && Number.isFinite(v) ? v : text;
}

function readSetting(fs) {
  const s = { model: $("[name=model]", fs).value, sampler: $("[name=sampler]", fs).value };
  if (s.sampler !== "ddpm") s.steps = fieldValue($("[name=steps]", fs));
  if (s.sampler === "ddim") s.eta = fieldValue($("[name=eta]", fs));
  const digit = $("[name=digit]", fs);
  if (!digit.disabled) {
    s.digit = digit.value === "all" ? "all" : Number(digit.value);
    s.guidance = Number($("[name=guidance]", fs).value);
  }
  return s;
}

function describe(s) {
  const eta = s.sampler === "ddim" ? `, η = ${s.eta}` : "";
  const digit = s.digit === null || s.digit === undefined ? ""
    : ` · ${s.digit === "all" ? "all digits" : `digit ${s.digit}`}, w = ${s.guidance}`;
  return `${s.model} · ${s.sampler}, ${s.steps} steps${eta}${digit}`;
}

function makePanel(setting, steps, xT) {
  const panel = $("#run-template").content.firstElementChild.cloneNode(true);
  $(".title", panel).textContent = describe(setting);
  $("progress", panel).max = steps;
  const slider = $("input[type=range]", panel);
  slider.max = steps;
  panel.frames = [{ xt: xT, x0: null, label: "x<sub>T</sub>, the initial noise", status: "initial noise x_T" }];
  panel.steps = steps;
  slider.addEventListener("input", () => showFrame(panel, Number(slider.value)));
  showFrame(panel, 0);
  return panel;
}

function showFrame(panel, k) {
  const f = panel.frames[k];
  $("img.xt", panel).src = f.xt;
  if (f.x0) $("img.x0", panel).src = f.x0; else $("img.x0", panel).removeAttribute("src");
  $(".xt-caption", panel).innerHTML = f.label;
  $("output", panel).textContent = `${k} / ${panel.steps}`;
  $(".status", panel).textContent = f.status;
}

function onFrame(panel, ev) {
  panel.frames[ev.step] = {
    xt: ev.x_t, x0: ev.x0, label: ev.step === panel.steps ? "x<sub>0</sub>, the sample" : `x<sub>t</sub> after step ${ev.step}`,
    status: `step ${ev.step}/${panel.steps} · t = ${ev.t} · ${ev.ms.toFixed(1)} ms/step`,
  };
  $("progress", panel).value = ev.step;
  $("input[type=range]", panel).value = ev.step;
  showFrame(panel, ev.step);
}

function onDone(panel, ev) {
  const perStep = (1000 * ev.sampling_s / panel.steps).toFixed(1);
  $(".time", panel).textContent = `sampling ${ev.sampling_s.toFixed(2)} s (${perStep} ms/step); ` +
    `wall ${ev.wall_s.toFixed(2)} s with the frames drawn`;
  $("input[type=range]", panel).disabled = false;
  panel.dataset.state = "done";
}

// The response body as a sequence of server-sent events (JSON in each "data:" line).
async function* readEvents(body) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const data = block.split("\n").filter(l => l.startsWith("data: ")).map(l => l.slice(6)).join("\n");
      if (data) yield JSON.parse(data);
    }
  }
}

function setBusy(busy) {
  $("#generate").disabled = busy;
  $("#compare").disabled = busy;
  $("#stop").disabled = !busy;
}

async function run(ids) {
  if (controller) controller.abort();
  const request = {
    seed: fieldValue($("#seed")), n: fieldValue($("#n")),
    runs: ids.map(id => readSetting($(`#setting-${id}`))),
  };
  const runs = $("#runs");
  runs.replaceChildren();
  runs.classList.toggle("compare", ids.length === 2);
  const panels = [];
  controller = new AbortController();
  const mine = controller;
  setBusy(true);
  showMessage("");
  try {
    const response = await fetch("/api/generate", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify(request), signal: mine.signal,
    });
    if (!response.ok) {
      const answer = await response.json().catch(() => ({}));
      showMessage(answer.error || `the server answered ${response.status} ${response.statusText}`, true);
      return;
    }
    let ended = false;
    for await (const ev of readEvents(response.body)) {
      ended = ev.type === "end" || ev.type === "error";
      if (ev.type === "queued") {
        showMessage(ev.ahead ? `waiting: ${ev.ahead} generation(s) ahead of this one` : "");
      } else if (ev.type === "start") {
        showMessage("");
        panels[ev.run] = makePanel(ev.setting, ev.steps, ev.x_T);
        runs.append(panels[ev.run]);
      } else if (ev.type === "frame") {
        onFrame(panels[ev.run], ev);
      } else if (ev.type === "done") {
        onDone(panels[ev.run], ev);
      } else if (ev.type === "error") {
        showMessage(ev.error, true);
      }
    }
    if (!ended) showMessage("the generation stopped before its end: the server has stopped", true);
  } catch (e) {
    if (e.name === "AbortError") showMessage(mine === controller ? "stopped" : "");
    else showMessage(`the connection to the server failed: ${e.message}`, true);
  } finally {
    if (mine === controller) {
      controller = null;
      setBusy(false);
    }
  }
}

async function init() {
  try {
    config = await (await fetch("/api/models")).json();
  } catch (e) {
    showMessage(`cannot reach the server: ${e.message}`, true);
    return;
  }
  const names = config.models.map(m => m.name);
  for (const fs of document.querySelectorAll(".setting")) {
    const model = $("[name=model]", fs);
    const sampler = $("[name=sampler]", fs);
    for (const m of config.models) {
      const kind = m.conditional ? ", conditional" : "";
      model.add(new Option(`${m.name} (${m.arch}, ${m.params.toLocaleString("en")} parameters${kind})`, m.name));
    }
    for (const s of config.samplers) sampler.add(new Option(s, s));
    sampler.value = config.default_sampler;
    $("[name=steps]", fs).value = config.default_steps;
    $("[name=eta]", fs).value = config.default_eta;
    const digit = $("[name=digit]", fs);
    digit.add(new Option("all: a row each", "all"));
    for (let d = 0; d < config.digits; d++) digit.add(new Option(String(d), String(d)));
    const guidance = $("[name=guidance]", fs);
    guidance.value = config.default_guidance;
    guidance.addEventListener("input", () => { $(".guidance output", fs).textContent = guidance.value; });
    // a model brings its own sampling (a consistency student: its sampler at its steps)
    model.addEventListener("change", () => { ownSampling(fs); syncSetting(fs); });
    sampler.addEventListener("change", () => syncSetting(fs));
  }
  // Compare's default: a second model where there is one, else the same one at fewer steps.
  const b = $("#setting-b");
  if (names.length > 1) $("[name=model]", b).value = names[1];
  document.querySelectorAll(".setting").forEach(fs => { ownSampling(fs); syncSetting(fs); });
  if (names.length === 1) $("[name=steps]", b).value = Math.max(1, Math.round($("[name=steps]", b).value / 4));
  $("#n").max = config.max_images;
  $("#n").title = `1 to ${config.max_images}`;
  $("#controls").addEventListener("submit", e => { e.preventDefault(); run(["a"]); });
  $("#compare").addEventListener("click", () => run(["a", "b"]));
  $("#stop").addEventListener("click", () => controller && controller.abort());
  window.addEventListener("pagehide", () => controller && controller.abort());
  document.body.dataset.ready = "true";
}

init();
