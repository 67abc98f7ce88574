// The tour guide page: a Leaflet map with no tiles (Natural Earth country shapes from world-atlas,
// drawn with L.geoJSON), the corpus stops as dots, a pin with its plus code and nearest city, and the
// text streamed from POST /api/tour (Server-Sent Events read from fetch). With a second model
// ("compare"), both answer the same pin one after the other, so each has the whole CPU and the
// timings compare.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { pin: null, marker: null, options: null, models: {}, busy: false };
const ORDER = ["main", "compare"];

function fmtParams(n) {
  return n >= 1e9 ? (n / 1e9).toFixed(2) + " B" : n >= 1e6 ? (n / 1e6).toFixed(1) + " M" : String(n);
}

function modelTitle(name) {
  const m = state.models[name];
  if (!m) return name;
  const role = Object.keys(state.models).length > 1 ? (name === "main" ? "main" : "compare") : "model";
  return `${role}: ${m.label}`;
}

function modelMeta(name) {
  const m = state.models[name];
  if (!m) return "";
  let s = `${fmtParams(m.parameters)} parameters, ${m.layers} blocks, hidden ${m.hidden_size}`;
  const other = state.models[name === "main" ? "compare" : "main"];
  if (other) s += ` (${(100 * m.parameters / other.parameters).toFixed(0)}% of the other)`;
  return s;
}

async function getJSON(url) {
  const res = await fetch(url);
  if (!res.ok) throw new Error(`${url}: HTTP ${res.status}`);
  return res.json();
}

function setStatus(text, error = false) {
  $("status").textContent = text;
  $("status").className = "status" + (error ? " error" : "");
}

// -- the map ---------------------------------------------------------------------------------
function buildMap() {
  const map = L.map("map", { worldCopyJump: true, minZoom: 2, maxZoom: 14, zoomSnap: 0.5 }).setView([25, 60], 2);
  map.attributionControl.setPrefix('<a href="https://leafletjs.com">Leaflet</a>');
  map.attributionControl.addAttribution("Natural Earth via world-atlas; cities: GeoNames (CC BY 4.0)");
  getJSON("/static/vendor/world-atlas-2.0.2/countries-50m.json").then((topo) => {
    const countries = topojson.feature(topo, topo.objects.countries);
    L.geoJSON(countries, {
      interactive: false,
      style: { color: "#7d8c99", weight: 0.7, fillColor: "#f4f1e8", fillOpacity: 1 },
    }).addTo(map).bringToBack();
  }).catch((e) => setStatus("map shapes: " + e.message, true));
  map.on("click", (e) => setPin(e.latlng.wrap()));
  return map;
}

function addStops(map, places) {
  for (const p of places) {
    const held = p.split === "eval";
    L.circleMarker([p.lat, p.lng], {
      radius: 4, weight: 1, color: held ? "#a3520f" : "#124a7a", fillColor: held ? "#f28c28" : "#2f80c9",
      fillOpacity: 0.9, bubblingMouseEvents: true,
    }).bindTooltip(`${p.place}, ${p.city}<br><code>${p.plus_code}</code>`).addTo(map);
  }
}

async function setPin(latlng) {
  if (state.marker) state.marker.setLatLng(latlng); else state.marker = L.marker(latlng).addTo(state.map);
  state.pin = { lat: latlng.lat, lng: latlng.lng };
  $("pin-code").textContent = "...";
  try {
    const w = await getJSON(`/api/where?lat=${latlng.lat}&lng=${latlng.lng}`);
    if (state.pin.lat !== latlng.lat || state.pin.lng !== latlng.lng) return; // a newer click won
    $("pin-code").textContent = w.plus_code;
    const stop = w.stop ? ` (corpus stop, ${Math.round(w.stop_km * 1000)} m away)` : "";
    $("pin-place").textContent = w.place + stop;
    $("go").disabled = state.busy;
  } catch (e) {
    $("pin-code").textContent = "?";
    setStatus(e.message, true);
  }
}

// -- the controls ----------------------------------------------------------------------------
function buildControls(opts) {
  for (const t of opts.tags) {
    const label = document.createElement("label");
    label.innerHTML = `<input type="checkbox" value="${t.id}"> ${t.id}`;
    label.title = t.label;
    $("tags").appendChild(label);
  }
  for (const s of opts.styles) {
    const o = document.createElement("option");
    o.value = s.id;
    o.textContent = s.label;
    $("style").appendChild(o);
  }
  $("seed").value = opts.decoding.seed;
  $("attribution").textContent = Object.values(opts.attribution).join(" ");
  $("go").addEventListener("click", ask);
}

function request() {
  const body = {
    lat: state.pin.lat, lng: state.pin.lng, style: $("style").value,
    tags: [...document.querySelectorAll("#tags input:checked")].map((i) => i.value),
  };
  const max = $("max-tokens").value.trim();
  if (max) body.max_new_tokens = Number(max);
  if ($("sample").checked) body.decoding = { sample: true, seed: Number($("seed").value || 0) };
  return body;
}

function card(name, title, meta) {
  const div = document.createElement("div");
  div.className = "card";
  div.id = "out-" + name;
  div.innerHTML = `<h3></h3><div class="meta"></div><div class="text"></div><div class="stats"></div>`;
  div.querySelector("h3").textContent = title;
  div.querySelector(".meta").textContent = meta;
  $("outputs").appendChild(div);
  return div;
}

function showDone(div, d) {
  const tps = d.tokens_per_s == null ? "-" : d.tokens_per_s.toFixed(1);
  div.querySelector(".stats").textContent =
    `TTFT ${Math.round(d.ttft_ms)} ms · ${tps} tokens/s · ${d.n_new_tokens} tokens in ${d.seconds.toFixed(2)} s` +
    (d.stopped ? "" : " (cut at max)");
  div.querySelector(".meta").textContent += ` · ${d.decoding_text}, max ${d.max_new_tokens} new tokens`;
}

// POST /api/tour with stream: true, reading Server-Sent Events from the response body
async function runOne(name, body) {
  const div = card(name, modelTitle(name), modelMeta(name));
  const text = div.querySelector(".text");
  const res = await fetch("/api/tour", {
    method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ ...body, model: name, stream: true }),
  });
  if (!res.ok) {
    const err = await res.json().catch(() => ({ error: `HTTP ${res.status}` }));
    text.innerHTML = "";
    text.className = "text error";
    text.textContent = err.error;
    return null;
  }
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buf = "", done = null;
  for (;;) {
    const { value, done: end } = await reader.read();
    if (value) buf += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const line = buf.slice(0, cut).trim();
      buf = buf.slice(cut + 2);
      if (!line.startsWith("data:")) continue;
      const ev = JSON.parse(line.slice(5));
      if (ev.token !== undefined) text.textContent += ev.token;
      else if (ev.error) { text.className = "text error"; text.textContent += "\n" + ev.error; }
      else if (ev.done) { done = ev; text.textContent = ev.text; showDone(div, ev); }
    }
    if (end) break;
  }
  return done;
}

async function ask() {
  if (!state.pin || state.busy) return;
  state.busy = true;
  $("go").disabled = true;
  $("outputs").innerHTML = "";
  const body = request();
  try {
    for (const name of ORDER.filter((n) => n in state.models)) {
      setStatus(`${modelTitle(name)} is speaking...`);
      const d = await runOne(name, body);
      if (d) setStatus(`${d.place} · ${d.plus_code}`);
    }
  } catch (e) {
    setStatus(e.message, true);
  } finally {
    state.busy = false;
    $("go").disabled = false;
  }
}

// -- pre-generated examples ------------------------------------------------------------------
function showExample(ex) {
  const latlng = L.latLng(ex.lat, ex.lng);
  if (state.marker) state.marker.setLatLng(latlng); else state.marker = L.marker(latlng).addTo(state.map);
  state.map.setView(latlng, Math.max(state.map.getZoom(), 5));
  state.pin = { lat: ex.lat, lng: ex.lng };
  $("pin-code").textContent = ex.plus_code;
  $("pin-place").textContent = ex.place;
  $("outputs").innerHTML = "";
  for (const o of ex.outputs) {
    const div = card("example-" + o.model, `${o.model}: ${o.label} (pre-generated)`,
      `${fmtParams(o.parameters)} parameters · ${ex.style}, tags: ${ex.tags.join(", ") || "none"}`);
    div.querySelector(".text").textContent = o.text;
    showDone(div, { ...o, decoding_text: ex.decoding_text, max_new_tokens: ex.max_new_tokens });
  }
  setStatus(`example from ${ex.generated_at || "an earlier run"}; ask again for a live answer`);
  $("go").disabled = false;
}

function buildExamples(data) {
  const box = $("examples");
  if (!data.examples.length) {
    box.textContent = "none shipped (tourray tours examples writes them)";
    return;
  }
  for (const ex of data.examples) {
    const b = document.createElement("button");
    b.textContent = `${ex.title} · ${ex.style} · ${ex.tags.join(", ") || "no tags"}`;
    b.addEventListener("click", () => showExample({ ...ex, generated_at: data.generated_at }));
    box.appendChild(b);
  }
}

async function init() {
  state.map = buildMap();
  try {
    const [opts, places, examples] = await Promise.all([getJSON("/api/options"), getJSON("/api/places"), getJSON("/api/examples")]);
    state.options = opts;
    state.models = opts.models;
    $("models").textContent = ORDER.filter((n) => n in opts.models)
      .map((n) => `${modelTitle(n)} (${fmtParams(opts.models[n].parameters)})`).join(" vs ") + ` · ${opts.decoding.text}`;
    buildControls(opts);
    addStops(state.map, places.places);
    buildExamples(examples);
  } catch (e) {
    setStatus(e.message, true);
  }
}

init();
