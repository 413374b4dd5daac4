// Collection page: a `vgclip predict --out` folder, paged; filtered by label at these thresholds and searched by
// text on the server (/api/collection/items), so a large collection never travels to the browser whole.
"use strict";

const PAGE = 48;
const state = { info: null, thresholds: {}, checked: new Set(), offset: 0, total: 0, query: "", request: 0, timer: null };
const $ = (id) => document.getElementById(id);

function body() {
  return { offset: state.offset, limit: PAGE, labels: [...state.checked], match: $("match").value, rule: $("rule").value,
           thresholds: state.thresholds, query: state.query, k: Number($("k").value) || 100 };
}

/** Ask for the current page; an answer to an older request (the sliders moved since) is dropped. */
async function load() {
  const id = ++state.request;
  vg.status($("status"), "Loading…");
  try {
    const out = await vg.json("/api/collection/items", { method: "POST", headers: { "Content-Type": "application/json" },
                                                        body: JSON.stringify(body()) });
    if (id !== state.request) return;
    state.total = out.total;
    renderItems(out);
    renderCounts(out.counts);
    vg.status($("status"), describe(out));
    $("status").dataset.total = String(out.total);
    $("status").dataset.offset = String(out.offset);
  } catch (e) {
    if (id === state.request) vg.status($("status"), e.message, true);
  }
  $("prev").disabled = state.offset === 0;
  $("next").disabled = state.offset + PAGE >= state.total;
}

/** Reload soon (sliders send many events while dragged); filters changed, so back to the first page. */
function reload(delay = 150) {
  state.offset = 0;
  clearTimeout(state.timer);
  state.timer = setTimeout(load, delay);
}

function describe(out) {
  const n = out.items.length;
  const where = n ? `Images ${out.offset + 1}–${out.offset + n} of ${out.total.toLocaleString()}` : `No image of ${out.total.toLocaleString()}`;
  const parts = [where];
  if (out.labels.length) {
    const rule = out.rule === "top" ? (l) => `${l} on top` : (l) => `${l} ≥ ${vg.fmt(out.thresholds[l])}`;
    parts.push(`with ${out.labels.map(rule).join(out.match === "all" ? " and " : " or ")}`);
  }
  if (out.query) parts.push(`best ${out.k} matches of “${out.query}”`);
  return parts.join(" · ");
}

function barRow(label, value, threshold) {
  const [lo, hi] = vg.range(state.info.score);
  const pct = (x) => `${Math.max(0, Math.min(100, ((x - lo) / (hi - lo)) * 100))}%`;
  const on = threshold === null ? false : value >= threshold;
  const row = vg.el("div", { class: "bar-row" + (on ? " on" : "") });
  const bar = vg.el("div", { class: "bar" }, vg.el("div", { class: "fill" }));
  bar.firstChild.style.width = pct(value);
  if (threshold !== null) { const tick = vg.el("div", { class: "tick" }); tick.style.left = pct(threshold); bar.append(tick); }
  row.append(vg.el("span", { class: "lab", text: label, title: label }), bar, vg.el("span", { class: "val", text: vg.fmt(value) }));
  return row;
}

function renderItems(out) {
  const top = out.rule === "top";
  $("items").replaceChildren(...out.items.map((it) => {
    const card = vg.el("div", { class: "item", "data-row": String(it.row), "data-key": it.key });
    card.append(vg.el("img", { src: it.thumb, alt: it.name, loading: "lazy" }));
    card.append(vg.el("div", { class: "name", text: it.name, title: it.path || it.key }));
    const meta = vg.el("div", { class: "meta", text: `${it.width}×${it.height}` });
    if (it.similarity !== null) meta.append(" · ", vg.el("span", { class: "sim", text: `cosine ${vg.fmt(it.similarity)}` }));
    card.append(meta);
    const chips = it.predicted.length ? it.predicted.map((l) => vg.el("span", { class: "chip", text: l }))
                                      : [vg.el("span", { class: "chip none", text: "(no label)" })];
    card.append(vg.el("div", { class: "chips" }, ...chips));
    for (const [l, s] of Object.entries(it.scores)) card.append(barRow(l, s, top ? null : out.thresholds[l]));
    return card;
  }));
}

function renderCounts(counts) {
  for (const row of $("label-thresholds").querySelectorAll("tbody tr")) {
    row.querySelector(".count").textContent = (counts[row.dataset.label] ?? 0).toLocaleString();
  }
}

function setThreshold(label, value) {
  state.thresholds[label] = value;
  const row = $("label-thresholds").querySelector(`tr[data-label="${CSS.escape(label)}"]`);
  row.querySelector("input[type=range]").value = value;
  row.querySelector("output").value = vg.fmt(value, 4);
}

function renderLabels() {
  const [lo, hi] = vg.range(state.info.score);
  $("label-thresholds").querySelector("tbody").replaceChildren(...state.info.labels.map((l) => {
    const box = vg.el("input", { type: "checkbox", class: "pick", checked: state.checked.has(l) });
    const slider = vg.el("input", { type: "range", min: lo, max: hi, step: "any", class: "label-threshold" });
    const row = vg.el("tr", { "data-label": l }, vg.el("td", {}, box), vg.el("td", { text: l, title: l }),
                      vg.el("td", {}, slider, vg.el("output", {})), vg.el("td", { class: "count" }));
    box.addEventListener("change", () => {
      if (box.checked) state.checked.add(l); else state.checked.delete(l);
      row.classList.toggle("on", box.checked);
      reload(0);
    });
    slider.addEventListener("input", () => { setThreshold(l, Number(slider.value)); if (state.checked.has(l)) reload(); else reload(300); });
    return row;
  }));
  for (const l of state.info.labels) setThreshold(l, state.thresholds[l]);
}

function ruleChanged() {
  const top = $("rule").value === "top";
  for (const input of document.querySelectorAll("#label-thresholds input[type=range], #global-threshold")) input.disabled = top;
  reload(0);
}

function initThresholds(info) {
  const [lo, hi] = vg.range(info.score);
  const start = info.global_threshold ?? (info.score === "softmax" ? 1 / info.labels.length : (lo + hi) / 2);
  const slider = $("global-threshold");
  slider.min = lo; slider.max = hi; slider.value = start;
  $("global-value").value = vg.fmt(start, 4);
  for (const l of info.labels) state.thresholds[l] = info.thresholds ? info.thresholds[l] : start;
  $("rule").value = info.thresholds ? "thresholds" : "top";
}

async function init() {
  const info = await vg.json("/api/collection");
  if (!info.available) { $("about").textContent = info.reason; vg.status($("status"), info.reason, true); return; }
  state.info = info;
  $("k").max = info.max_k;
  const given = info.thresholds ? "the predict run's thresholds" : "no thresholds in the run: the top label";
  $("about").replaceChildren(vg.el("div", { text: `${info.count.toLocaleString()} images, ${info.labels.length} labels, ${info.score} scores (${given}).` }),
                             vg.el("div", { text: `Folder: ${info.folder}` }), vg.el("div", { text: `Tagged with: ${info.checkpoint ?? "?"}` }));
  $("warnings").replaceChildren(...info.warnings.map((w) => vg.el("li", { text: w })));
  initThresholds(info);
  renderLabels();
  ruleChanged();
  $("rule").addEventListener("change", ruleChanged);
  $("match").addEventListener("change", () => reload(0));
  $("global-threshold").addEventListener("input", (e) => {
    const v = Number(e.target.value);
    $("global-value").value = vg.fmt(v, 4);
    for (const l of info.labels) setThreshold(l, v);
    reload();
  });
  $("search-form").addEventListener("submit", (e) => { e.preventDefault(); state.query = $("query").value.trim(); reload(0); });
  $("clear-search").addEventListener("click", () => { $("query").value = ""; state.query = ""; reload(0); });
  $("prev").addEventListener("click", () => { state.offset = Math.max(0, state.offset - PAGE); load(); });
  $("next").addEventListener("click", () => { if (state.offset + PAGE < state.total) { state.offset += PAGE; load(); } });
}

init().catch((e) => vg.status($("status"), e.message, true));
