// The petserve playground: plain JavaScript over the public HTTP API (README.md, API).
// Server data is only ever written with textContent, never parsed as HTML.
"use strict";

// What the page sends for an adapter, by its task (or kind): route, media part names, fields.
const MODES = {
  vqa: {route: "/v1/vqa", accept: "image/*,video/*", question: true, text: (r) => r.answer},
  caption: {route: "/v1/caption", accept: "image/*,video/*", text: (r) => r.caption},
  classify: {route: "/v1/classify", accept: "image/*", text: (r) => r.label},
  zeroshot: {route: "/v1/classify", accept: "image/*", labels: true, text: (r) => r.label},
  audio: {route: "/v1/audio/classify", accept: "audio/*", text: (r) => r.label},
};
const HINTS = {
  "image/*,video/*": "Drop an image or a short video here, or choose a file",
  "image/*": "Drop an image here, or choose a file",
  "audio/*": "Drop an audio clip (wav, flac, ogg) here, or choose a file",
};
// CLIP zero-shot over typed labels: /v1/classify without an adapter.
const ZERO_SHOT = {id: "", kind: "clip", task: "zero-shot labels", version: null};

const $ = (id) => document.getElementById(id);
let picked = null;      // the adapter row picked: {id, kind, task, version}
let previewUrl = null;

function modeOf(adapter) {
  if (adapter === ZERO_SHOT) return "zeroshot";
  if (adapter.kind === "cache" || adapter.task === "classify") return "classify";
  if (adapter.task === "audio_classify") return "audio";
  if (adapter.task === "caption") return "caption";
  return "vqa";         // vqa, gqa, and the rest: a question
}

function authHeaders() {
  const token = $("token").value.trim();
  return token ? {Authorization: `Bearer ${token}`} : {};
}

// fetch -> {ok, status, body, ms}; an API error body is {"error": {"code", "message"}}.
async function call(method, path, body) {
  const start = performance.now();
  let response;
  try {
    response = await fetch(path, {method, body, headers: authHeaders()});
  } catch (e) {
    return {ok: false, status: 0, body: {error: {code: "network_error", message: String(e)}}, ms: 0};
  }
  const text = await response.text();
  const ms = performance.now() - start;
  let parsed = null;
  try { parsed = JSON.parse(text); } catch { parsed = null; }
  if (!response.ok && !(parsed && parsed.error)) {
    parsed = {error: {code: `http_${response.status}`, message: text.slice(0, 200) || response.statusText}};
  }
  return {ok: response.ok, status: response.status, body: parsed, ms};
}

function showError(box, answer) {
  const {code, message} = answer.body.error;
  const p = document.createElement("p");
  p.className = "error";
  p.setAttribute("role", "alert");
  p.textContent = `${code}: ${message}` + (answer.status ? ` (HTTP ${answer.status})` : "");
  box.replaceChildren(p);
}

function addTerm(list, term, value, className) {
  const dt = document.createElement("dt");
  const dd = document.createElement("dd");
  dt.textContent = term;
  dd.textContent = value;
  if (className) dd.className = className;
  list.append(dt, dd);
}

// ---- adapters ----------------------------------------------------------------------------------

async function loadAdapters(select) {
  $("adapters-status").textContent = "Loading adapters…";
  const answer = await call("GET", "/v1/adapters");
  if (!answer.ok) {
    showError($("adapters-status"), answer);
    return;
  }
  const adapters = [...answer.body.adapters, ZERO_SHOT];
  $("adapters").tBodies[0].replaceChildren(...adapters.map(adapterRow));
  $("adapters-status").textContent = `${answer.body.adapters.length} adapters`;
  const keep = select ?? (picked ? picked.id : null);
  const row = adapters.find((a) => a.id === keep) || adapters[0];
  pick(row);
}

function adapterRow(adapter) {
  const tr = document.createElement("tr");
  tr.dataset.adapter = adapter.id;
  const radio = document.createElement("input");
  radio.type = "radio";
  radio.name = "adapter";
  radio.id = `adapter-${adapter.id || "zero-shot"}`;
  radio.value = adapter.id;
  radio.addEventListener("change", () => pick(adapter));
  const label = document.createElement("label");
  label.htmlFor = radio.id;
  label.textContent = adapter.id || "(none: CLIP zero-shot)";
  const first = document.createElement("td");
  first.append(radio, " ", label);
  tr.append(first);
  for (const value of [adapter.kind, adapter.task, adapter.version ?? "", MODES[modeOf(adapter)].route]) {
    const td = document.createElement("td");
    td.textContent = value;
    tr.append(td);
  }
  return tr;
}

function pick(adapter) {
  picked = adapter;
  const mode = MODES[modeOf(adapter)];
  const radio = $(`adapter-${adapter.id || "zero-shot"}`);
  if (radio) radio.checked = true;
  $("route").textContent = `POST ${mode.route}` + (adapter.id ? ` with adapter ${adapter.id}` : "");
  $("question-field").hidden = !mode.question;
  $("question").required = Boolean(mode.question);
  $("labels-field").hidden = !mode.labels;
  $("labels").required = Boolean(mode.labels);
  if ($("media").accept !== mode.accept) {
    $("media").accept = mode.accept;
    $("drop-hint").textContent = HINTS[mode.accept];
  }
}

// ---- asking ------------------------------------------------------------------------------------

function mediaPart(mode, file) {
  if (mode === MODES.audio) return "audio";
  return mode.accept.includes("video") && file.type.startsWith("video/") ? "video" : "image";
}

function showPreview(file) {
  if (previewUrl) URL.revokeObjectURL(previewUrl);
  previewUrl = null;
  const box = $("preview");
  box.replaceChildren();
  if (!file) return;
  const tag = file.type.startsWith("video/") ? "video" : file.type.startsWith("audio/") ? "audio"
    : file.type.startsWith("image/") ? "img" : null;
  if (!tag) return;
  previewUrl = URL.createObjectURL(file);
  const media = document.createElement(tag);
  media.src = previewUrl;
  if (tag === "img") media.alt = `preview of ${file.name}`;
  else media.controls = true;
  media.addEventListener("error", () => media.remove());    // the server will say what is wrong
  box.append(media);
}

async function ask(event) {
  event.preventDefault();
  const file = $("media").files[0];
  if (!picked || !file) {
    $("result").textContent = "Pick an adapter and a file first.";
    return;
  }
  const mode = MODES[modeOf(picked)];
  const form = new FormData();
  if (picked.id) form.append("adapter", picked.id);
  if (mode.question) form.append("question", $("question").value);
  if (mode.labels) {
    const labels = $("labels").value.split("\n").map((l) => l.trim()).filter(Boolean);
    form.append("labels", JSON.stringify(labels));
  }
  form.append(mediaPart(mode, file), file, file.name);
  $("send").disabled = true;
  $("result").setAttribute("aria-busy", "true");
  $("result").textContent = "Waiting for the answer…";
  const answer = await call("POST", mode.route, form);
  $("send").disabled = false;
  $("result").setAttribute("aria-busy", "false");
  if (answer.ok) showAnswer(mode, answer);
  else showError($("result"), answer);
}

function showAnswer(mode, answer) {
  const r = answer.body;
  const list = document.createElement("dl");
  addTerm(list, "answer", mode.text(r), "answer");
  if (r.logprob !== undefined) addTerm(list, "logprob", r.logprob.toFixed(3));
  if (r.scores) addTerm(list, "scores", r.scores.map(([l, p]) => `${l} ${p.toFixed(3)}`).join(", "));
  const used = Array.isArray(r.adapter) ? r.adapter.join(" + ") : r.adapter ?? "backbone alone";
  addTerm(list, "adapter", used + (r.adapter_version ? ` v${r.adapter_version}` : ""));
  addTerm(list, "latency", `${answer.ms.toFixed(0)} ms (measured by the page)`, "latency");
  const timings = Object.entries(r.timings_ms || {}).map(([k, v]) => `${k} ${v.toFixed(1)}`);
  addTerm(list, "server timings_ms", timings.join(", ") || "none", "timings");
  $("result").replaceChildren(list);
}

// ---- uploading ---------------------------------------------------------------------------------

async function upload(event) {
  event.preventDefault();
  const id = $("upload-id").value.trim();
  $("upload-send").disabled = true;
  $("upload-result").textContent = "Uploading…";
  const answer = await call("PUT", `/v1/adapters/${encodeURIComponent(id)}`, $("upload-file").files[0]);
  $("upload-send").disabled = false;
  if (!answer.ok) {
    showError($("upload-result"), answer);
    return;
  }
  const a = answer.body;
  const p = document.createElement("p");
  p.className = "ok";
  p.textContent = `Uploaded ${a.id} version ${a.version} (${a.kind}, ${a.task || "no task"}, `
    + `${a.trainable_parameters} trainable parameters)`;
  $("upload-result").replaceChildren(p);
  await loadAdapters(a.id);
}

// ---- wiring ------------------------------------------------------------------------------------

function wireDropZone() {
  const zone = $("drop");
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    if (!e.dataTransfer.files.length) return;
    $("media").files = e.dataTransfer.files;
    showPreview($("media").files[0]);
  });
  $("media").addEventListener("change", () => showPreview($("media").files[0]));
}

document.addEventListener("DOMContentLoaded", () => {
  wireDropZone();
  $("ask").addEventListener("submit", ask);
  $("upload").addEventListener("submit", upload);
  $("refresh").addEventListener("click", () => loadAdapters());
  loadAdapters();
});
