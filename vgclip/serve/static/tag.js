// Tag page: upload images once to /api/predict, then apply thresholds here (no further request to the model).
"use strict";

const state = { defaults: null, files: [], scored: null, thresholds: {} };
const $ = (id) => document.getElementById(id);

function currentLabels() {
  return $("labels").value.split(/[\n,]/).map((s) => s.trim()).filter(Boolean);
}

/** Thresholds start at the ones the server applied (`given`: the served thresholds file's, with its global value
 *  for a label it does not name), else every label at the slider's value. */
function resetThresholds(labels, score, given) {
  const [lo, hi] = vg.range(score);
  const slider = $("global-threshold");
  slider.min = lo; slider.max = hi;
  if (!given && (Number(slider.value) < lo || Number(slider.value) > hi)) slider.value = (lo + hi) / 2;
  state.thresholds = {};
  for (const l of labels) state.thresholds[l] = given && l in given ? given[l] : Number(slider.value);
  $("global-value").value = vg.fmt(Number(slider.value), 4);
  renderThresholdTable(labels);
}

/** The server's warnings about the thresholds (labels the file has no value for, softmax on another label set). */
function showWarnings(lines) {
  $("warnings").replaceChildren(...(lines || []).map((w) => vg.el("li", { text: w })));
}

function renderThresholdTable(labels) {
  const body = $("label-thresholds").querySelector("tbody");
  body.replaceChildren(...labels.map((l) => {
    const input = vg.el("input", { type: "number", step: "0.001", value: state.thresholds[l].toFixed(4),
                                   class: "label-threshold", "data-label": l });
    input.addEventListener("input", () => {
      const v = Number(input.value);
      if (input.value !== "" && Number.isFinite(v)) { state.thresholds[l] = v; renderResults(); }
    });
    return vg.el("tr", {}, vg.el("td", { text: l }), vg.el("td", {}, input));
  }));
}

function predictedOf(scores, labels) {
  return labels.filter((l) => scores[l] >= state.thresholds[l]);
}

function barRow(label, value, threshold, score) {
  const [lo, hi] = vg.range(score);
  const pct = (x) => `${Math.max(0, Math.min(100, ((x - lo) / (hi - lo)) * 100))}%`;
  const row = vg.el("div", { class: "bar-row" + (value >= threshold ? " on" : ""), "data-label": label,
                             "data-score": String(value) });
  const bar = vg.el("div", { class: "bar" }, vg.el("div", { class: "fill" }), vg.el("div", { class: "tick" }));
  bar.firstChild.style.width = pct(value);
  bar.lastChild.style.left = pct(threshold);
  bar.title = `score ${value.toFixed(4)}, threshold ${threshold.toFixed(4)}`;
  row.append(vg.el("span", { class: "lab", text: label }), bar, vg.el("span", { class: "val", text: vg.fmt(value) }));
  return row;
}

function renderResults() {
  const s = state.scored;
  if (!s) return;
  $("results").replaceChildren(...s.results.map((r) => {
    const chosen = predictedOf(r.scores, s.labels);
    const card = vg.el("div", { class: "result", "data-image": r.image });
    const info = vg.el("div", {}, vg.el("div", { class: "name", text: r.image }),
      vg.el("div", { class: "predicted" + (chosen.length ? "" : " none"), text: chosen.join(", ") || "(none)" }));
    card.append(vg.el("div", { class: "top" }, vg.el("img", { src: r.url, alt: r.image }), info));
    const order = [...s.labels].sort((a, b) => r.scores[b] - r.scores[a]);
    for (const l of order) card.append(barRow(l, r.scores[l], state.thresholds[l], s.score));
    return card;
  }));
}

async function scoreImages() {
  const labels = currentLabels();
  if (!state.files.length) { vg.status($("status"), "Pick or drop images first.", true); return; }
  const form = new FormData();
  for (const f of state.files) form.append("images", f, f.name);
  form.append("labels", labels.join("\n"));
  form.append("score", $("score").value);
  form.append("templates", $("templates").value);
  $("run").disabled = true;
  showWarnings([]);
  vg.status($("status"), `Scoring ${state.files.length} image(s)…`);
  try {
    const out = await vg.json("/api/predict", { method: "POST", body: form });
    const urls = state.files.map((f) => URL.createObjectURL(f));
    state.scored = { labels: out.labels, score: out.score, results: out.results.map((r, i) => ({ ...r, url: urls[i] })) };
    resetThresholds(out.labels, out.score, out.thresholds);
    showWarnings(out.warnings);
    renderResults();
    vg.status($("status"), `${out.results.length} image(s) scored (${out.score}, ${out.templates} prompts).`);
  } catch (e) {
    vg.status($("status"), e.message, true);
  } finally {
    $("run").disabled = false;
  }
}

function setFiles(list) {
  state.files = [...list].filter((f) => f.type.startsWith("image/") || /\.(jpe?g|png|gif|bmp|webp|tiff?)$/i.test(f.name));
  vg.status($("status"), `${state.files.length} image(s) chosen.`);
  if (state.files.length) scoreImages();
}

async function init() {
  state.defaults = await vg.json("/api/labels");
  $("labels").value = state.defaults.labels.join("\n");
  $("labels-source").textContent = `Default labels: ${state.defaults.source}.`;
  $("score").value = state.defaults.score;
  $("templates").value = state.defaults.templates;
  // The slider starts at the thresholds file's global threshold (step "any": the exact value, not a snapped one).
  const d = state.defaults, slider = $("global-threshold"), [lo, hi] = vg.range(d.score);
  slider.min = lo; slider.max = hi;
  if (d.global_threshold !== null && d.global_threshold !== undefined) slider.value = d.global_threshold;
  resetThresholds(d.labels, d.score, d.thresholds);
  $("files").addEventListener("change", (e) => setFiles(e.target.files));
  $("run").addEventListener("click", scoreImages);
  $("global-threshold").addEventListener("input", (e) => {
    const v = Number(e.target.value);
    $("global-value").value = vg.fmt(v, 4);
    const labels = state.scored ? state.scored.labels : currentLabels();
    for (const l of labels) state.thresholds[l] = v;
    renderThresholdTable(labels);
    renderResults();
  });
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); setFiles(e.dataTransfer.files); });
}

init().catch((e) => vg.status($("status"), e.message, true));
