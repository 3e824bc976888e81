// The studio page: key, request form, a job's live progress, the player, the job list.

import { api, ApiError, apiKey, setApiKey, stemAudio } from "./api.js";
import { followEvents } from "./sse.js";
import { StemPlayer, peaks } from "./player.js";
import { barGrid, drawRuler, drawTrack } from "./timeline.js";

const FINAL = new Set(["completed", "partial", "failed", "cancelled"]);
const $ = (id) => document.getElementById(id);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "text") node.textContent = value;
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children) node.append(child);
  return node;
}

const state = {
  config: { models: [], beats_per_bar: 4, max_duration_seconds: 120 },
  job: null,            // the open job's record (GET /jobs/<id>)
  follow: null,         // AbortController of the open job's event stream
  player: null,
  grid: null,
  waves: {},            // stem -> peaks
  downloads: [],        // object URLs to revoke
  cursor: null,         // GET /jobs next_cursor
  events: 0,
};
// Read-only handle for people (and the browser test) to look at the running page.
window.stemgenStudio = state;

// --- key ---------------------------------------------------------------------------------------
function showKeyStatus() {
  $("key-status").textContent = apiKey() ? "A key is set for this tab." : "No key set.";
}

$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  setApiKey($("api-key").value.trim());
  $("api-key").value = "";
  showKeyStatus();
  start();
});
$("forget-key").addEventListener("click", () => { setApiKey(""); showKeyStatus(); });

// --- the request form --------------------------------------------------------------------------
function clearErrors() {
  for (const node of document.querySelectorAll("[data-error-for]")) node.textContent = "";
  for (const node of document.querySelectorAll("[aria-invalid]")) node.removeAttribute("aria-invalid");
}

/** The error element for an API field path: the exact one, else its nearest listed parent. */
function errorSlot(field) {
  let path = field;
  for (;;) {
    const slot = document.querySelector(`[data-error-for="${CSS.escape(path)}"]`);
    if (slot) return slot;
    const dot = path.lastIndexOf(".");
    if (dot < 0) return $("form-error");
    path = path.slice(0, dot);
  }
}

function showErrors(error) {
  clearErrors();
  const fields = error.fields && error.fields.length ? error.fields : [{ field: "body", message: error.message }];
  for (const f of fields) {
    const slot = errorSlot(f.field);
    const index = f.field.match(/^parameters\.chords\.(\d+)$/);
    const text = index ? `chord ${Number(index[1]) + 1}: ${f.message}` : f.message;
    slot.textContent = slot.textContent ? `${slot.textContent}; ${text}` : text;
    const input = document.querySelector(`[data-field="${CSS.escape(slot.dataset.errorFor)}"]`);
    if (input) input.setAttribute("aria-invalid", "true");
  }
  const first = document.querySelector("[aria-invalid='true']");
  if (first && first.focus) first.focus();
}

function number(id) {
  const raw = $(id).value.trim();
  return raw === "" ? undefined : Number(raw);
}

function text(id) {
  const raw = $(id).value.trim();
  return raw === "" ? undefined : raw;
}

function requestBody() {
  const parameters = {
    target_bpm: number("f-bpm"),
    duration_seconds: number("f-duration"),
    key: text("f-key"),
    style: text("f-style"),
    prompt: text("f-prompt"),
    arrangement: $("f-arrangement").value,
    seed: number("f-seed"),
    model: $("f-model").value || undefined,
    output: { format: $("f-format").value, sample_rate: Number($("f-rate").value),
              bit_depth: number("f-bit-depth"), channels: number("f-channels") },
  };
  const chords = text("f-chords");
  if (chords) parameters.chords = chords.split(",").map((c) => c.trim()).filter(Boolean);
  if ($("f-condition").checked) parameters.condition_on_audio = true;
  const body = {
    generation_request_id: `studio-${Date.now().toString(36)}-${Math.random().toString(36).slice(2, 8)}`,
    audio_file_id: $("f-audio-file-id").value.trim(),
    target_stems: [...document.querySelectorAll("input[name=stem]:checked")].map((c) => c.value),
    parameters,
  };
  const callback = text("f-callback");
  if (callback) body.callback_url = callback;
  return JSON.parse(JSON.stringify(body)); // drops the undefined fields
}

function barsToDuration() {
  const bars = number("f-bars"); const bpm = number("f-bpm");
  const beats = state.config.beats_per_bar;
  $("bars-help").textContent = `${beats} beats a bar.`;
  if (bars && bpm) $("f-duration").value = String(Math.round(((bars * beats * 60) / bpm) * 1000) / 1000);
}
$("f-bars").addEventListener("input", barsToDuration);
$("f-bpm").addEventListener("input", () => { if (number("f-bars")) barsToDuration(); });

$("request-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  clearErrors();
  $("submit").disabled = true;
  try {
    const { data } = await api("/generate", { method: "POST", body: requestBody() });
    await openJob(data.job_id);
    refreshJobs();
  } catch (error) {
    if (error instanceof ApiError) showErrors(error);
    else showErrors({ message: String(error) });
  } finally {
    $("submit").disabled = false;
  }
});

// --- a job: progress, cancel -------------------------------------------------------------------
function progressRow(stem) {
  const id = `progress-${stem.stem}`;
  return el("div", { class: "stem-progress", id: `row-${stem.stem}` },
    el("label", { for: id, text: stem.stem }),
    el("progress", { id, max: "1", value: String(stem.progress || 0) }),
    el("span", { id: `status-${stem.stem}`, text: stem.status }));
}

function renderJob(job) {
  $("job-section").hidden = false;
  $("job-heading").textContent = `Job ${job.generation_request_id}`;
  $("job-status").textContent = `Status: ${job.status}${job.error ? ` (${job.error})` : ""}`;
  $("job-status").dataset.status = job.status;
  const list = $("stem-progress");
  list.replaceChildren(...job.stems.map(progressRow));
  $("cancel").disabled = FINAL.has(job.status) || job.status === "cancelling";
}

function applyEvent(event) {
  let data;
  try { data = JSON.parse(event.data); } catch (_) { return; }
  state.events += 1;
  const log = $("event-log");
  log.append(el("li", { text: `${event.type} ${data.stem || ""} ${data.status || ""} ${data.progress ?? ""}`.trim() }));
  if (log.children.length > 200) log.firstElementChild.remove();
  if (!state.job || data.job_id !== state.job.job_id) return;
  if (data.stem) {
    const bar = $(`progress-${data.stem}`);
    if (bar && typeof data.progress === "number") bar.value = data.progress;
    const status = $(`status-${data.stem}`);
    if (status && data.status) status.textContent = data.status;
  } else if (data.status) {
    state.job.status = data.status;
    $("job-status").textContent = `Status: ${data.status}${data.error ? ` (${data.error})` : ""}`;
    $("job-status").dataset.status = data.status;
    $("cancel").disabled = FINAL.has(data.status) || data.status === "cancelling";
  }
}

async function openJob(jobId) {
  if (state.follow) state.follow.abort();
  const follow = new AbortController();
  state.follow = follow;
  clearPlayer();
  const { data: job } = await api(`/jobs/${encodeURIComponent(jobId)}`);
  state.job = job;
  $("event-log").replaceChildren();
  renderJob(job);
  if (!FINAL.has(job.status)) {
    try {
      await followEvents(`/jobs/${encodeURIComponent(jobId)}/events`, {
        signal: follow.signal,
        onEvent: applyEvent,
        isFinal: (event) => event.type === "job" && FINAL.has(JSON.parse(event.data).status),
        onState: async (s) => {
          $("job-status").dataset.stream = s;
          if (s !== "reconnecting") return;
          // A stream that ended without the final event: the job may have finished meanwhile.
          try {
            const { data } = await api(`/jobs/${encodeURIComponent(jobId)}`);
            if (FINAL.has(data.status)) follow.abort();
          } catch (_) { /* the reconnection will tell */ }
        },
      });
    } catch (error) {
      $("job-status").textContent = `Events: ${error.message}`;
    }
    if (state.follow !== follow) return; // another job was opened meanwhile
    const { data } = await api(`/jobs/${encodeURIComponent(jobId)}`);
    state.job = data;
    renderJob(data);
  }
  if (state.follow !== follow) return;
  await loadPlayer(state.job);
}

$("cancel").addEventListener("click", async () => {
  if (!state.job) return;
  $("cancel").disabled = true;
  try {
    const { data } = await api(`/jobs/${encodeURIComponent(state.job.job_id)}`, { method: "DELETE" });
    $("job-status").textContent = `Status: ${data.status}`;
    $("job-status").dataset.status = data.status;
  } catch (error) {
    $("job-status").textContent = `Cancel: ${error.message}`;
  }
});

// --- the player --------------------------------------------------------------------------------
function clearPlayer() {
  if (state.player) state.player.clear();
  for (const url of state.downloads) URL.revokeObjectURL(url);
  state.downloads = [];
  state.waves = {};
  $("tracks").replaceChildren();
  $("player-section").hidden = true;
}

function fmt(value, digits = 1) {
  return typeof value === "number" ? value.toFixed(digits) : "–";
}

function analysisText(stem, plan) {
  const parts = [];
  const a = stem.analysis;
  if (a && a.harmonic === false) parts.push("not harmonic (no key or chord analysis)");
  else if (a) {
    if (a.silent) parts.push("no pitched content");
    if (a.key) parts.push(`key ${a.key.key} (${a.key_vs_plan || "?"} vs plan ${plan ? plan.key : "?"}, confidence ${fmt(a.key.confidence, 2)})`);
    if (a.chord_fit) parts.push(`chord fit ${fmt(a.chord_fit.mean, 2)}`);
  }
  if (stem.loudness) parts.push(`${fmt(stem.loudness.integrated_lufs)} LUFS, true peak ${fmt(stem.loudness.true_peak_dbtp)} dBTP`);
  return parts.join(" · ");
}

function toggle(label, stem, onChange) {
  const button = el("button", { type: "button", "aria-pressed": "false", text: label, "aria-label": `${label} ${stem}` });
  button.addEventListener("click", () => {
    const pressed = button.getAttribute("aria-pressed") !== "true";
    button.setAttribute("aria-pressed", String(pressed));
    onChange(pressed);
  });
  return button;
}

function trackView(stem, plan, blobUrl, filename) {
  const player = state.player;
  const gainId = `gain-${stem.stem}`;
  const gain = el("input", { id: gainId, type: "range", min: "0", max: "1.5", step: "0.01", value: "1" });
  gain.addEventListener("input", () => player.setGain(stem.stem, Number(gain.value)));
  const chords = (plan.chords || []).join(" ");
  const canvas = el("canvas", { class: "wave", id: `wave-${stem.stem}`, height: "110", role: "img",
    "aria-label": `${stem.stem} waveform over ${plan.bars} bars, chords ${chords}` });
  return el("div", { class: "track", id: `track-${stem.stem}` },
    el("div", { class: "track-head" },
      el("h3", { text: stem.stem }),
      toggle("Mute", stem.stem, (on) => player.setMuted(stem.stem, on)),
      toggle("Solo", stem.stem, (on) => player.setSoloed(stem.stem, on)),
      el("label", { for: gainId, text: `Gain` }), gain,
      el("a", { href: blobUrl, download: filename, id: `download-${stem.stem}`, text: `Download ${filename}` })),
    el("p", { class: "track-info", id: `info-${stem.stem}`, text: analysisText(stem, plan) }),
    canvas);
}

async function loadPlayer(job) {
  const done = job.stems.filter((s) => s.status === "completed");
  if (!done.length || !job.plan) return;
  if (!state.player) state.player = new StemPlayer();
  const player = state.player;
  state.grid = barGrid(job.plan);
  $("plan-summary").textContent = `${job.plan.key}, ${job.plan.bpm} BPM, ${job.plan.bars} bars of ${job.plan.time_signature}: ${(job.plan.chords || []).join(" ")}`;
  $("loop-from").max = String(job.plan.bars);
  $("loop-to").max = String(job.plan.bars);
  $("loop-to").value = String(Math.min(job.plan.bars, 2));
  $("player-section").hidden = false;
  for (const stem of done) {
    const { bytes, type } = await stemAudio(job.job_id, stem.stem);
    if (state.job !== job) return;
    const url = URL.createObjectURL(new Blob([bytes], { type })); // before decoding detaches bytes
    state.downloads.push(url);
    const filename = `${job.generation_request_id}-${stem.stem}.${stem.format || "wav"}`;
    const track = await player.addTrack(stem.stem, bytes);
    state.waves[stem.stem] = peaks(track.buffer, 1200);
    $("tracks").append(trackView(stem, job.plan, url, filename));
  }
  $("player-section").dataset.loaded = String(player.tracks.length);
  draw();
}

function draw() {
  const player = state.player;
  if (!player || !state.grid || !player.tracks.length) return;
  const duration = Math.max(player.duration, state.grid.bars * state.grid.barSeconds);
  const view = { playhead: player.currentTime(), loop: player.loop };
  drawRuler($("ruler"), state.grid, duration, view);
  for (const t of player.tracks) {
    const canvas = $(`wave-${t.stem}`);
    if (canvas) drawTrack(canvas, state.waves[t.stem], state.grid, duration, view);
  }
  const label = player.playing ? "Pause" : "Play"; // also when the stems played to their end
  if ($("play").textContent !== label) $("play").textContent = label;
  const p = view.playhead;
  $("position").textContent = `${Math.floor(p / 60)}:${(p % 60).toFixed(1).padStart(4, "0")}`;
}

function animate() {
  draw();
  requestAnimationFrame(animate);
}

function loopSeconds() {
  const grid = state.grid;
  const from = Math.max(1, Math.min(grid.bars, Math.round(number("loop-from") || 1)));
  const to = Math.max(from, Math.min(grid.bars, Math.round(number("loop-to") || from)));
  return { start: (from - 1) * grid.barSeconds, end: to * grid.barSeconds };
}

async function updateLoop() {
  if (!state.player || !state.grid) return;
  const { start, end } = loopSeconds();
  await state.player.setLoop($("loop").checked, start, end);
}

$("play").addEventListener("click", async () => {
  if (!state.player) return;
  if (state.player.playing) { state.player.pause(); $("play").textContent = "Play"; return; }
  await state.player.play();
  $("play").textContent = "Pause";
});
$("stop").addEventListener("click", () => {
  if (state.player) state.player.stop();
  $("play").textContent = "Play";
});
for (const id of ["loop", "loop-from", "loop-to"]) $(id).addEventListener("change", updateLoop);
$("ruler").addEventListener("click", (event) => {
  if (!state.player || !state.grid) return;
  const rect = event.target.getBoundingClientRect();
  state.player.seek(((event.clientX - rect.left) / rect.width) * state.player.duration);
});
document.addEventListener("keydown", (event) => {
  // Space plays or pauses, unless a control has the focus (it has its own use of the key).
  if (event.key !== " " || !state.player || event.target.closest("input, select, textarea, button, a")) return;
  event.preventDefault();
  $("play").click();
});

// --- the job list ------------------------------------------------------------------------------
function jobRow(job) {
  const open = el("button", { type: "button", text: "Open", "aria-label": `Open job ${job.generation_request_id}` });
  open.addEventListener("click", () => openJob(job.job_id).catch((e) => { $("job-status").textContent = e.message; }));
  return el("tr", { "data-job-id": job.job_id },
    el("td", { text: new Date(job.created_at * 1000).toLocaleString() }),
    el("td", { text: job.generation_request_id }),
    el("td", { text: job.status }),
    el("td", { text: job.stems.map((s) => s.stem).join(", ") }),
    el("td", {}, open));
}

async function refreshJobs(more = false) {
  const query = new URLSearchParams({ limit: "10" });
  if (more && state.cursor) query.set("cursor", state.cursor);
  try {
    const { data } = await api(`/jobs?${query}`);
    const body = $("jobs-table").tBodies[0];
    if (!more) body.replaceChildren();
    body.append(...data.jobs.map(jobRow));
    state.cursor = data.next_cursor;
    $("more-jobs").hidden = !data.next_cursor;
  } catch (error) {
    $("key-status").textContent = error.status === 401 ? "The key was refused (401)." : `Jobs: ${error.message}`;
  }
}
$("refresh-jobs").addEventListener("click", () => refreshJobs());
$("more-jobs").addEventListener("click", () => refreshJobs(true));

// --- start -------------------------------------------------------------------------------------
async function start() {
  try {
    const { data } = await api("/studio/config");
    state.config = data;
    const select = $("f-model");
    select.replaceChildren(el("option", { value: "", text: `default (${data.models[0]})` }),
      ...data.models.map((m) => el("option", { value: m, text: m })));
    barsToDuration();
  } catch (error) {
    if (error.status === 401) { $("key-status").textContent = "Paste an API key to start."; return; }
  }
  refreshJobs();
}

showKeyStatus();
start();
requestAnimationFrame(animate);
