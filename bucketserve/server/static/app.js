// bucketserve's web page: the dashboard polls GET /dashboard/state once a second and draws
// plain SVG; the chat streams POST /v1/chat/completions. No library, nothing from the internet.
"use strict";

const POLL_MS = 1000;
const WINDOW_S = 300; // what the time charts show
const KEY_STORE = "bucketserve.apiKey"; // sessionStorage: this tab only, never in a URL
const SVG = "http://www.w3.org/2000/svg";
const $ = (id) => document.getElementById(id);

// ---------------------------------------------------------------------------------- helpers
function authHeaders(extra = {}) {
  const key = sessionStorage.getItem(KEY_STORE);
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

function el(tag, attrs = {}, text) {
  const node = tag.startsWith("svg:") ? document.createElementNS(SVG, tag.slice(4)) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

function fmt(x, digits = 0) {
  if (x === null || x === undefined || Number.isNaN(x)) return "–";
  return Number(x).toLocaleString(undefined, { maximumFractionDigits: digits, minimumFractionDigits: digits });
}

function fmtPair(a, b) {
  if (a === null || a === undefined) return "–";
  return Math.max(a, b ?? 0) >= 1000 ? `${fmt(a / 1000, 2)} / ${fmt(b / 1000, 2)} s` : `${fmt(a, a < 10 ? 1 : 0)} / ${fmt(b, b < 10 ? 1 : 0)} ms`;
}

function fmtMs(ms) {
  if (ms === null || ms === undefined) return "–";
  return ms >= 1000 ? `${fmt(ms / 1000, 2)} s` : `${fmt(ms, ms < 10 ? 1 : 0)} ms`;
}

function niceMax(v) {
  if (!(v > 0)) return 1;
  const p = 10 ** Math.floor(Math.log10(v));
  for (const m of [1, 2, 2.5, 5, 10]) if (v <= m * p) return m * p;
  return 10 * p;
}

function clear(svg) {
  while (svg.firstChild) svg.removeChild(svg.firstChild);
  const r = svg.getBoundingClientRect();
  return { w: Math.max(r.width, 200), h: Math.max(r.height, 100) };
}

// The time axis shared by the time charts and the bucket map: x of a time, and its labels.
function timeAxis(svg, now, w, h, m) {
  const x = (t) => m.l + (1 - (now - t) / WINDOW_S) * (w - m.l - m.r);
  for (const ago of [300, 240, 180, 120, 60, 0]) {
    svg.append(el("svg:text", { x: x(now - ago), y: h - 4, "text-anchor": "middle" }, ago ? `-${ago / 60} min` : "now"));
  }
  return x;
}

// A time chart: x is seconds before now (WINDOW_S .. 0), series of [t, y] points.
function timeChart(svg, now, series, { yMax, yFmt = (v) => fmt(v), targets = [] } = {}) {
  const { w, h } = clear(svg);
  const m = { l: 46, r: 10, t: 18, b: 20 };
  const top = niceMax(Math.max(yMax ?? 0, ...series.flatMap((s) => s.points.map((p) => p[1])), ...targets.map((t) => t.y)));
  const x = timeAxis(svg, now, w, h, m);
  const y = (v) => h - m.b - (v / top) * (h - m.t - m.b);
  for (let i = 0; i <= 4; i++) {
    const v = (top * i) / 4;
    svg.append(el("svg:line", { x1: m.l, x2: w - m.r, y1: y(v), y2: y(v), class: "axis" }));
    svg.append(el("svg:text", { x: m.l - 4, y: y(v) + 4, "text-anchor": "end" }, yFmt(v)));
  }
  // One line per target value (classes may share one), labels kept apart.
  const byValue = new Map();
  for (const t of targets) byValue.set(t.y, [...(byValue.get(t.y) ?? []), t.label]);
  let lastLabelY = Infinity;
  for (const [v, labels] of [...byValue].sort((a, b) => a[0] - b[0])) {
    svg.append(el("svg:line", { x1: m.l, x2: w - m.r, y1: y(v), y2: y(v), class: "target" }));
    const ly = Math.min(y(v) - 3, lastLabelY - 12);
    svg.append(el("svg:text", { x: w - m.r, y: ly, "text-anchor": "end", fill: "var(--bad)" }, labels.join("; ")));
    lastLabelY = ly;
  }
  let lx = m.l;
  for (const s of series) {
    const pts = s.points.filter((p) => now - p[0] <= WINDOW_S);
    if (pts.length) {
      const d = pts.map((p, i) => `${i ? "L" : "M"}${x(p[0]).toFixed(1)},${y(p[1]).toFixed(1)}`).join("");
      svg.append(el("svg:path", { d, fill: "none", stroke: s.color, "stroke-width": 1.8, "stroke-dasharray": s.dash ?? "" }));
      if (s.dots) for (const p of pts) svg.append(el("svg:circle", { cx: x(p[0]), cy: y(p[1]), r: 2.5, fill: s.color }));
    }
    svg.append(el("svg:rect", { x: lx, y: 4, width: 10, height: 3, fill: s.color }));
    const label = el("svg:text", { x: lx + 14, y: 10, class: "legend" }, s.name);
    svg.append(label);
    lx += 24 + s.name.length * 6.2;
  }
}

// --------------------------------------------------------------------------------- dashboard
// The page's copy of the server's state: samples and steps accumulate; each poll asks only
// for what is newer than the last of each (two cursors: steps stop when the server idles).
const view = { history: [], steps: [], latest: null, settings: null, since: null, stepsSince: null };

function merge(data) {
  view.settings = data.settings ?? view.settings; // sent on the first poll only
  data.settings = view.settings;
  view.latest = data;
  const seen = new Set(view.history.map((s) => s.t));
  for (const s of data.history) if (!seen.has(s.t)) view.history.push(s);
  view.history.sort((a, b) => a.t - b.t);
  view.history = view.history.filter((s) => data.now - s.t <= WINDOW_S + 5);
  const seenSteps = new Set(view.steps.map((s) => s.t));
  for (const s of data.steps) if (!seenSteps.has(s.t)) view.steps.push(s);
  view.steps = view.steps.slice(-240);
  if (view.history.length) view.since = view.history[view.history.length - 1].t;
  if (view.steps.length) view.stepsSince = view.steps[view.steps.length - 1].t;
}

function renderCards(d) {
  const c = d.current;
  const t = d.totals;
  $("c-running").textContent = fmt(c.running);
  $("c-running-note").textContent = `max ${d.settings.max_num_seqs} at once`;
  $("c-waiting").textContent = fmt(c.waiting);
  $("c-waiting-note").textContent = `in ${c.queues.length} bucket${c.queues.length === 1 ? "" : "s"}`;
  $("c-kv").textContent = `${fmt(c.kv_usage * 100, 1)}%`;
  $("c-kv").title = `${t.kv_blocks_used} of ${t.kv_blocks_total} blocks of ${d.settings.block_size} tokens`;
  $("c-kv-bar").style.width = `${Math.min(100, c.kv_usage * 100)}%`;
  $("c-tput").textContent = fmt(throughputOver(10));
  const L = d.latency;
  $("c-ttft").textContent = L.requests ? fmtPair(L.ttft_p50_ms, L.ttft_p99_ms) : "–";
  $("c-ttft-note").textContent = L.targets.classes.length
    ? `targets by prompt length · last ${L.window_s} s`
    : `target ${fmtMs(L.targets.ttft_s * 1000)} · last ${L.window_s} s`;
  $("c-tpot").textContent = L.requests ? fmtPair(L.tpot_p50_ms, L.tpot_p99_ms) : "–";
  const tpotTargets = targetLines(L.targets, "tpot_s");
  $("c-tpot-note").textContent = tpotTargets.length === 0
    ? "no TPOT target"
    : tpotTargets.length === 1 ? `target ${fmtMs(tpotTargets[0].y)}` : "targets by prompt length";
  $("c-slo").textContent = L.slo_attainment === null ? "–" : `${fmt(L.slo_attainment * 100, 0)}%`;
  $("c-slo-note").textContent = `${fmt(L.requests)} requests, last ${L.window_s} s`;
  $("c-rejected").textContent = fmt(c.rejected);
  $("c-rejected-note").textContent = `${fmt(t.late)} late · ${fmt(t.preemptions)} preempted`;
}

function throughputOver(seconds) {
  const h = view.history;
  if (h.length < 2) return 0;
  const last = h[h.length - 1];
  let first = h[h.length - 2];
  for (const s of h) if (last.t - s.t <= seconds) { first = s; break; }
  return last.t > first.t ? (last.generated_tokens - first.generated_tokens) / (last.t - first.t) : 0;
}

function renderBuckets(d) {
  const c = d.current;
  const maxLen = d.settings.max_model_len;
  $("bucket-summary").textContent =
    `· ${c.queues.length} now · ${fmt(c.splits)} splits, ${fmt(c.merges)} merges since start`;
  const body = $("bucket-table").tBodies[0];
  body.replaceChildren();
  const most = Math.max(1, ...c.queues.map((q) => q[2]));
  for (const [lo, hi, n] of c.queues) {
    const tr = el("tr");
    tr.append(el("td", {}, `[${lo}, ${hi})`));
    const td = el("td", {}, String(n));
    const bar = el("span", { class: "bar" });
    bar.style.width = `${(n / most) * 120}px`;
    td.append(bar);
    tr.append(td);
    body.append(tr);
  }
  // The map: one column per sample, one band per bucket, coloured by its queue.
  const svg = $("bucket-map");
  const { w, h } = clear(svg);
  const m = { l: 46, r: 8, t: 6, b: 20 };
  const now = d.now;
  const x = timeAxis(svg, now, w, h, m);
  const y = (len) => h - m.b - Math.sqrt(Math.min(len, maxLen) / maxLen) * (h - m.t - m.b); // sqrt: short prompts get room
  const hist = view.history;
  const peak = Math.max(1, ...hist.flatMap((s) => s.queues.map((q) => q[2])));
  for (let i = 0; i < hist.length; i++) {
    const s = hist[i];
    const x0 = x(s.t);
    const x1 = i + 1 < hist.length ? x(hist[i + 1].t) : x(now);
    if (x1 < m.l) continue;
    for (const [lo, hi, n] of s.queues) {
      const shade = n === 0 ? "#eef1f5" : `hsl(215 75% ${88 - 55 * Math.sqrt(n / peak)}%)`;
      const r = el("svg:rect", { x: Math.max(m.l, x0), y: y(hi), width: Math.max(0.5, x1 - Math.max(m.l, x0)), height: Math.max(0.5, y(lo) - y(hi)), fill: shade });
      r.append(el("svg:title", {}, `[${lo}, ${hi}): ${n} waiting`));
      svg.append(r);
      svg.append(el("svg:line", { x1: Math.max(m.l, x0), x2: x1, y1: y(hi), y2: y(hi), stroke: "#fff", "stroke-width": 1 }));
    }
  }
  for (const len of [0, 64, 256, 1024, 2048, 4096, 8192, 16384, 32768].filter((v) => v <= maxLen)) {
    svg.append(el("svg:text", { x: m.l - 4, y: y(len) + 4, "text-anchor": "end" }, fmt(len)));
  }
  // Splits and merges, read from the samples' counters, newest first.
  const events = [];
  for (let i = 1; i < hist.length; i++) {
    const a = hist[i - 1];
    const b = hist[i];
    const when = new Date((d.wall - (now - b.t)) * 1000).toLocaleTimeString();
    if (b.splits > a.splits) events.push(`${when} split ×${b.splits - a.splits} → ${b.queues.length} buckets`);
    if (b.merges > a.merges) events.push(`${when} merge ×${b.merges - a.merges} → ${b.queues.length} buckets`);
  }
  const list = $("bucket-events");
  list.replaceChildren(...events.reverse().slice(0, 30).map((e) => el("li", {}, e)));
}

// The rate of a counter kept in the samples, between consecutive samples.
function perSecond(h, key) {
  const out = [];
  for (let i = 1; i < h.length; i++) {
    const dt = h[i].t - h[i - 1].t;
    if (dt > 0) out.push([h[i].t, (h[i][key] - h[i - 1][key]) / dt]);
  }
  return out;
}

// The SLO targets as dashed lines: one per length class (when the server has classes) and
// the default for requests longer than every class.
function targetLines(targets, key) {
  const lines = targets.classes
    .filter((c) => c[key] !== null)
    .map((c) => ({ y: c[key] * 1000, label: `target, prompts ≤ ${fmt(c.max_prompt)}` }));
  if (targets[key] !== null) lines.push({ y: targets[key] * 1000, label: targets.classes.length ? "default target" : "target" });
  return lines;
}

function renderTimeCharts(d) {
  const now = d.now;
  const h = view.history;
  const maxSeqs = d.settings.max_num_seqs;
  timeChart($("load-chart"), now, [
    { name: "running", color: "var(--decode)", points: h.map((s) => [s.t, s.running]) },
    { name: "waiting", color: "var(--mixed)", points: h.map((s) => [s.t, s.waiting]) },
    { name: "KV use (% of pool)", color: "var(--accent)", dash: "4 2", points: h.map((s) => [s.t, s.kv_usage * 100]) },
    { name: "refused (429) /s", color: "var(--bad)", points: perSecond(h, "rejected") },
  ], { yMax: Math.min(100, Math.max(4, maxSeqs / 8)) });
  const rate = perSecond(h, "generated_tokens");
  timeChart($("tput-chart"), now, [{ name: "output tokens/s", color: "var(--accent)", points: rate }]);
  const L = d.latency;
  const bins = L.bins;
  timeChart($("ttft-chart"), now, [
    { name: "p50", color: "var(--accent)", dots: true, points: bins.filter((b) => b.ttft_p50_ms !== null).map((b) => [b.t, b.ttft_p50_ms]) },
    { name: "p99", color: "var(--mixed)", dots: true, points: bins.filter((b) => b.ttft_p99_ms !== null).map((b) => [b.t, b.ttft_p99_ms]) },
  ], { yFmt: fmtMs, targets: targetLines(L.targets, "ttft_s") });
  timeChart($("tpot-chart"), now, [
    { name: "p50", color: "var(--accent)", dots: true, points: bins.filter((b) => b.tpot_p50_ms !== null).map((b) => [b.t, b.tpot_p50_ms]) },
    { name: "p99", color: "var(--mixed)", dots: true, points: bins.filter((b) => b.tpot_p99_ms !== null).map((b) => [b.t, b.tpot_p99_ms]) },
  ], { yFmt: fmtMs, targets: targetLines(L.targets, "tpot_s") });
}

function stepKind(s) {
  if (s.prefill_tokens && s.decode_rows) return ["mixed", "var(--mixed)"];
  return s.prefill_tokens ? ["prompt", "var(--prefill)"] : ["decode", "var(--decode)"];
}

function renderSteps(d) {
  const steps = view.steps.slice(-120);
  const svg = $("steps-chart");
  const { w, h } = clear(svg);
  const m = { l: 46, r: 8, t: 18, b: 6 };
  const top = niceMax(Math.max(1, ...steps.map((s) => s.ms)));
  const bw = (w - m.l - m.r) / 120;
  const y = (v) => h - m.b - (v / top) * (h - m.t - m.b);
  for (let i = 0; i <= 4; i++) {
    const v = (top * i) / 4;
    svg.append(el("svg:line", { x1: m.l, x2: w - m.r, y1: y(v), y2: y(v), class: "axis" }));
    svg.append(el("svg:text", { x: m.l - 4, y: y(v) + 4, "text-anchor": "end" }, fmtMs(v)));
  }
  steps.forEach((s, i) => {
    const [kind, color] = stepKind(s);
    const r = el("svg:rect", { x: m.l + (120 - steps.length + i) * bw + 0.5, y: y(s.ms), width: Math.max(1, bw - 1), height: y(0) - y(s.ms), fill: color });
    r.append(el("svg:title", {}, `${kind}: ${fmtMs(s.ms)}, ${s.prefill_tokens} prompt tokens in ${s.prefill_rows} rows, ${s.decode_rows} decode rows`));
    svg.append(r);
  });
  let lx = m.l;
  for (const [name, color] of [["prompt", "var(--prefill)"], ["decode", "var(--decode)"], ["both", "var(--mixed)"]]) {
    svg.append(el("svg:rect", { x: lx, y: 4, width: 10, height: 8, fill: color }));
    svg.append(el("svg:text", { x: lx + 14, y: 12, class: "legend" }, name));
    lx += 70;
  }
  const tot = d.totals;
  $("steps-summary").textContent = `· ${fmt(tot.steps)} since start · padding ${fmt(tot.padding_ratio * 100, 1)}% of computed tokens`;
  const body = $("steps-table").tBodies[0];
  body.replaceChildren();
  for (const s of view.steps.slice(-8).reverse()) {
    const tr = el("tr");
    const pad = s.padded_tokens ? 1 - s.real_tokens / s.padded_tokens : 0;
    for (const text of [`${fmt(d.now - s.t, 1)} s ago`, fmtMs(s.ms), `${s.prefill_tokens} (${s.prefill_rows})`, String(s.decode_rows), `${fmt(pad * 100, 0)}%`]) {
      tr.append(el("td", {}, text));
    }
    body.append(tr);
  }
}

function renderSettings(d) {
  const body = $("settings").tBodies[0];
  if (body.childElementCount) return; // they do not change while the server runs
  const rows = Object.entries(d.settings).map(([k, v]) => [k, typeof v === "object" && v !== null ? JSON.stringify(v) : String(v)]);
  for (const [k, v] of [["model", d.model], ...rows]) {
    const tr = el("tr");
    tr.append(el("td", {}, k), el("td", {}, v));
    body.append(tr);
  }
}

function render() {
  const d = view.latest;
  if (!d) return;
  $("model").textContent = d.model;
  $("policy").textContent = `policy: ${d.settings.policy}`;
  renderCards(d);
  renderBuckets(d);
  renderTimeCharts(d);
  renderSteps(d);
  renderSettings(d);
}

function setStatus(text, ok) {
  const s = $("status");
  s.textContent = text;
  s.className = `status ${ok ? "ok" : "down"}`;
}

async function poll() {
  try {
    const params = new URLSearchParams();
    if (view.since !== null) params.set("since", view.since);
    if (view.stepsSince !== null) params.set("steps_since", view.stepsSince);
    const key = sessionStorage.getItem(KEY_STORE);
    const resp = await fetch(`/dashboard/state?${params}`, { headers: authHeaders(), cache: "no-store" });
    if (resp.status === 401) {
      setStatus("needs the API key", false);
      // A poll sent before the user gave a key says nothing about the key given since.
      if (key === sessionStorage.getItem(KEY_STORE)) askKey(key ? "the server refused that key" : "");
    } else if (resp.ok) {
      const data = await resp.json();
      merge(data);
      setStatus(data.running ? `up ${fmt(data.uptime_s / 60, 1)} min` : "stopping", data.running);
      if (!$("dashboard").hidden) render();
    } else {
      setStatus(`state: HTTP ${resp.status}`, false);
    }
  } catch (e) {
    setStatus("unreachable", false);
  }
  setTimeout(poll, POLL_MS);
}

// ---------------------------------------------------------------------------------- API key
function askKey(message = "") {
  const dialog = $("key-dialog");
  $("key-button").hidden = false;
  $("key-error").textContent = message;
  if (!dialog.open) dialog.showModal();
}

$("key-form").addEventListener("submit", () => {
  const key = $("key-input").value.trim();
  if (key) sessionStorage.setItem(KEY_STORE, key);
  $("key-input").value = "";
});
$("key-button").addEventListener("click", () => askKey());

// ------------------------------------------------------------------------------------- tabs
for (const tab of document.querySelectorAll("button.tab")) {
  tab.addEventListener("click", () => {
    for (const t of document.querySelectorAll("button.tab")) t.classList.toggle("active", t === tab);
    for (const page of document.querySelectorAll("section.page")) page.hidden = page.id !== tab.dataset.tab;
    if (tab.dataset.tab === "dashboard") render();
    else $("prompt").focus();
  });
}

// ------------------------------------------------------------------------------------- chat
// One conversation at a time: Clear starts a new one, and a reply that ends after it
// (stopped by the Clear) must not land in the new conversation.
const chat = { messages: [], controller: null, conversation: 0 };

function addBubble(role, text) {
  const empty = document.querySelector("#messages .empty");
  if (empty) empty.remove();
  const bubble = el("div", { class: `msg ${role}` });
  const body = el("div", { class: "text" }, text);
  bubble.append(body);
  $("messages").append(bubble);
  bubble.scrollIntoView({ block: "end" });
  return { bubble, body };
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
}

async function* sseEvents(resp) {
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (line.startsWith("data: ")) yield line.slice(6);
      }
    }
  }
}

async function sendMessage(text) {
  const conversation = chat.conversation;
  const turn = { role: "user", content: text };
  chat.messages.push(turn);
  addBubble("user", text);
  const { bubble, body } = addBubble("assistant", "");
  bubble.classList.add("streaming");
  const meta = el("div", { class: "meta" }, "waiting for the first token…");
  bubble.append(meta);
  const system = $("system").value.trim();
  const request = {
    messages: system ? [{ role: "system", content: system }, ...chat.messages] : chat.messages,
    stream: true,
    stream_options: { include_usage: true },
    temperature: Number($("temperature").value),
    max_tokens: Number($("max-tokens").value),
  };
  chat.controller = new AbortController();
  setBusy(true);
  const start = performance.now();
  let first = null;
  let chunks = 0;
  let usage = null;
  let reply = "";
  let ending = "";
  try {
    const resp = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: authHeaders({ "Content-Type": "application/json" }),
      body: JSON.stringify(request),
      signal: chat.controller.signal,
    });
    if (!resp.ok) {
      const err = await resp.json().catch(() => ({}));
      if (resp.status === 401) askKey("the server refused that key");
      throw new Error(err.error?.message ?? `HTTP ${resp.status}`);
    }
    for await (const data of sseEvents(resp)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) usage = chunk.usage;
      const choice = chunk.choices?.[0];
      const delta = choice?.delta?.content;
      if (delta) {
        if (first === null) {
          first = performance.now();
          meta.textContent = `TTFT ${fmtMs(first - start)} · streaming…`;
        }
        chunks += 1;
        reply += delta;
        // Append, not rewrite: rewriting the whole text per token is quadratic, and a long
        // reply then renders slower than the server writes it.
        body.append(delta);
      }
      if (choice?.finish_reason) ending = choice.finish_reason === "length" ? " · stopped at max tokens" : "";
    }
  } catch (e) {
    if (e.name === "AbortError") {
      ending = " · stopped";
    } else {
      bubble.classList.add("error");
      ending = ` · error: ${e.message}`;
    }
  } finally {
    const end = performance.now();
    const tokens = usage?.completion_tokens ?? chunks;
    const rate = first !== null && tokens > 1 && end > first ? (tokens - 1) / ((end - first) / 1000) : null;
    meta.textContent = first === null
      ? `no reply${ending}`
      : `TTFT ${fmtMs(first - start)} · ${fmt(rate, 1)} tokens/s · ${tokens} tokens${ending}`;
    bubble.classList.remove("streaming");
    bubble.dataset.tokens = String(tokens);
    bubble.dataset.done = "true";
    if (conversation === chat.conversation) {
      // A turn with no reply is dropped, so that the next request does not send two user
      // turns in a row.
      if (reply) chat.messages.push({ role: "assistant", content: reply });
      else chat.messages.splice(chat.messages.indexOf(turn), 1);
    }
    chat.controller = null;
    setBusy(false);
  }
}

$("chat-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("prompt").value.trim();
  if (!text || chat.controller) return;
  $("prompt").value = "";
  sendMessage(text);
});
$("prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    $("chat-form").requestSubmit();
  }
});
$("stop").addEventListener("click", () => chat.controller?.abort());
$("clear").addEventListener("click", () => {
  chat.conversation += 1;
  chat.controller?.abort();
  chat.messages = [];
  $("messages").replaceChildren();
});

window.addEventListener("resize", render);
poll();
