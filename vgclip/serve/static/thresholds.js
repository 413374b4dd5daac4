// Threshold page: the report's scores arrive once; every rate, table and gallery is recomputed here on each move.
"use strict";

const $ = (id) => document.getElementById(id);
const R = { data: null, mode: "global", global: 0.5, perClass: {}, objective: "manual" };
const RATES = ["accuracy", "sensitivity", "specificity", "precision", "f1"];
const COLOURS = { accuracy: "#2f6fdf", sensitivity: "#1f9d55", specificity: "#c2410c", f1: "#7c3aed" };
const GALLERY_MAX = 12;
const SVG = { w: 640, h: 300, left: 40, right: 10, top: 10, bottom: 28 };

function thresholdOf(c) { return R.mode === "per_class" ? R.perClass[c] : R.global; }

/** Rates from counts, as vgclip.eval.metrics.rates (null where 0/0). */
function rates(tp, fp, tn, fn) {
  const div = (a, b) => (b > 0 ? a / b : null);
  return { accuracy: div(tp + tn, tp + fp + tn + fn), sensitivity: div(tp, tp + fn), specificity: div(tn, tn + fp),
           precision: div(tp, tp + fp), f1: div(2 * tp, 2 * tp + fp + fn) };
}

/** Per-class confusion counts at the current thresholds (label -1: ignored), plus exact match. */
function evaluate() {
  const d = R.data, C = d.classes.length;
  const counts = d.classes.map(() => ({ tp: 0, fp: 0, tn: 0, fn: 0 }));
  const t = d.classes.map(thresholdOf);
  let exact = 0;
  for (let i = 0; i < d.scores.length; i++) {
    let right = true;
    for (let c = 0; c < C; c++) {
      const y = d.labels[i][c];
      if (y < 0) continue;
      const p = d.scores[i][c] >= t[c];
      const k = counts[c];
      if (p && y) k.tp++; else if (p) k.fp++; else if (y) k.fn++; else k.tn++;
      if (p !== (y === 1)) right = false;
    }
    if (right) exact++;
  }
  const per = counts.map((k) => ({ ...k, ...rates(k.tp, k.fp, k.tn, k.fn) }));
  const sum = (key) => counts.reduce((a, k) => a + k[key], 0);
  const micro = rates(sum("tp"), sum("fp"), sum("tn"), sum("fn"));
  const macro = {};
  for (const r of RATES) {
    const vals = per.map((p) => p[r]).filter((v) => v !== null);
    macro[r] = vals.length ? vals.reduce((a, b) => a + b, 0) / vals.length : null;
  }
  return { per, micro, macro, exact: exact / d.scores.length };
}

function xOf(t) {
  const [lo, hi] = R.span;
  return SVG.left + ((t - lo) / (hi - lo)) * (SVG.w - SVG.left - SVG.right);
}
function tOf(x) {
  const [lo, hi] = R.span;
  const f = (x - SVG.left) / (SVG.w - SVG.left - SVG.right);
  return Math.max(lo, Math.min(hi, lo + f * (hi - lo)));
}
function yOf(v) { return SVG.top + (1 - v) * (SVG.h - SVG.top - SVG.bottom); }

function svgEl(tag, attrs) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  return node;
}

function drawCurve() {
  const svg = $("curve"), curve = R.data.curve, avg = $("averaging").value;
  svg.replaceChildren();
  for (const v of [0, 0.25, 0.5, 0.75, 1]) {
    svg.append(svgEl("line", { x1: SVG.left, x2: SVG.w - SVG.right, y1: yOf(v), y2: yOf(v), stroke: "#e5e7eb" }));
    const label = svgEl("text", { x: 4, y: yOf(v) + 4, "font-size": 11, fill: "#667085" });
    label.textContent = v.toFixed(2);
    svg.append(label);
  }
  for (const f of [0, 0.25, 0.5, 0.75, 1]) {
    const t = R.span[0] + f * (R.span[1] - R.span[0]);
    const anchor = f === 0 ? "start" : f === 1 ? "end" : "middle";
    const label = svgEl("text", { x: xOf(t), y: SVG.h - 8, "font-size": 11, fill: "#667085", "text-anchor": anchor });
    label.textContent = t.toFixed(2);
    svg.append(label);
  }
  for (const r of ["accuracy", "sensitivity", "specificity", "f1"]) {
    const ys = curve[`${avg}_${r}`];
    const pts = curve.threshold.map((t, i) => (ys[i] === null ? null : `${xOf(t).toFixed(1)},${yOf(ys[i]).toFixed(1)}`));
    svg.append(svgEl("polyline", { points: pts.filter(Boolean).join(" "), fill: "none", stroke: COLOURS[r],
                                   "stroke-width": 2, class: `line-${r}` }));
  }
  const x = xOf(R.global);
  svg.append(svgEl("line", { id: "threshold-line", x1: x, x2: x, y1: SVG.top, y2: SVG.h - SVG.bottom, stroke: "#111",
                             "stroke-width": 2, "stroke-dasharray": R.mode === "per_class" ? "4 3" : "" }));
  svg.append(svgEl("rect", { class: "handle", x: x - 8, y: SVG.top, width: 16, height: SVG.h - SVG.top - SVG.bottom,
                             fill: "transparent" }));
  $("legend").replaceChildren(...["accuracy", "sensitivity", "specificity", "f1"].map((r) => {
    const i = vg.el("i");
    i.style.background = COLOURS[r];
    return vg.el("span", {}, i, r === "f1" ? "F1" : r);
  }));
}

function renderTables(m) {
  const rows = ["macro", "micro"].map((avg) => vg.el("tr", { "data-avg": avg }, vg.el("td", { text: avg }),
    ...RATES.map((r) => vg.el("td", { class: `${avg}-${r}`, text: vg.fmt(m[avg][r]) }))));
  $("averages").querySelector("tbody").replaceChildren(...rows);
  $("exact").textContent = `Exact match (whole label set right): ${vg.fmt(m.exact)}; mode ${R.mode}.`;
  const d = R.data;
  $("per-class").querySelector("tbody").replaceChildren(...d.classes.map((c, k) => {
    const input = vg.el("input", { type: "number", step: "0.0005", value: thresholdOf(c).toFixed(4),
                                   class: "class-threshold", "data-class": c, disabled: R.mode !== "per_class" });
    input.addEventListener("change", () => {
      if (Number.isFinite(Number(input.value)) && input.value !== "") { R.perClass[c] = Number(input.value); R.objective = "manual"; update(false); }
    });
    const p = m.per[k];
    return vg.el("tr", { "data-class": c }, vg.el("td", { text: c }), vg.el("td", {}, input),
      ...["sensitivity", "specificity", "precision", "f1"].map((r) => vg.el("td", { text: vg.fmt(p[r]) })),
      ...["tp", "fp", "tn", "fn"].map((r) => vg.el("td", { text: String(p[r]) })),
      vg.el("td", { text: vg.fmt(d.AP ? d.AP[c] : null) }));
  }));
}

function renderGallery() {
  const d = R.data, c = d.classes.indexOf($("gallery-class").value);
  if (c < 0) return;
  const t = thresholdOf(d.classes[c]), shown = new Set(d.gallery);
  const groups = { tp: [], fp: [], fn: [] };
  d.scores.forEach((row, i) => {
    const y = d.labels[i][c];
    if (y < 0) return;
    const p = row[c] >= t;
    const key = p && y ? "tp" : p ? "fp" : y ? "fn" : null;
    if (key) groups[key].push(i);
  });
  for (const [key, idx] of Object.entries(groups)) {
    idx.sort((a, b) => d.scores[b][c] - d.scores[a][c]);
    $(`${key}-title`).textContent = `${{ tp: "True positives", fp: "False positives", fn: "False negatives" }[key]} (${idx.length})`;
    $(key).replaceChildren(...idx.slice(0, GALLERY_MAX).map((i) => {
      const id = d.image_ids[i];
      const fig = vg.el("figure", { "data-image": id });
      if (shown.has(id)) fig.append(vg.el("img", { src: `/api/report/images/${encodeURIComponent(id)}`, alt: id, loading: "lazy" }));
      fig.append(vg.el("figcaption", { text: `${id} ${vg.fmt(d.scores[i][c])}` }));
      return fig;
    }));
  }
}

function update(redraw = true) {
  $("global-threshold").value = R.global;
  $("global-value").value = vg.fmt(R.global, 4);
  $("global-value").dataset.value = String(R.global);  // exact (the slider snaps to its step)
  if (redraw) drawCurve(); else {
    const line = $("threshold-line");
    if (line) { line.setAttribute("x1", xOf(R.global)); line.setAttribute("x2", xOf(R.global)); }
  }
  renderTables(evaluate());
  renderGallery();
}

function apply(info, objective) {
  R.mode = info.mode;
  $("mode").value = info.mode;
  R.global = Number(info.global);
  R.perClass = { ...info.per_class };
  R.objective = objective;
  update();
}

async function tune(objective) {
  try {
    const info = await vg.json("/api/report/tune", { method: "POST", headers: { "Content-Type": "application/json" },
                                                    body: JSON.stringify({ objective, mode: $("mode").value }) });
    apply(info, objective);
    vg.status($("save-status"), `Moved to ${objective} (${info.mode}).`);
  } catch (e) { vg.status($("save-status"), e.message, true); }
}

async function save() {
  const body = { mode: R.mode, global_threshold: R.global, per_class: R.perClass, objective: R.objective };
  try {
    const out = await vg.json("/api/report/thresholds", { method: "POST", headers: { "Content-Type": "application/json" },
                                                          body: JSON.stringify(body) });
    vg.status($("save-status"), `Saved ${out.path}`);
  } catch (e) { vg.status($("save-status"), e.message, true); }
}

function dragging() {
  const svg = $("curve");
  let active = false;
  const move = (e) => {
    const box = svg.getBoundingClientRect();
    R.global = tOf(((e.clientX - box.left) / box.width) * SVG.w);
    if (R.mode === "global") for (const c of R.data.classes) R.perClass[c] = R.global;
    R.objective = "manual";
    update(false);
  };
  svg.addEventListener("pointerdown", (e) => { active = true; svg.setPointerCapture(e.pointerId); move(e); });
  svg.addEventListener("pointermove", (e) => { if (active) move(e); });
  svg.addEventListener("pointerup", () => { active = false; });
}

function wire() {
  $("global-threshold").addEventListener("input", (e) => {
    R.global = Number(e.target.value);
    if (R.mode === "global") for (const c of R.data.classes) R.perClass[c] = R.global;
    R.objective = "manual";
    update(false);
  });
  $("mode").addEventListener("change", (e) => { R.mode = e.target.value; update(); });
  $("averaging").addEventListener("change", () => drawCurve());
  for (const o of ["accuracy", "youden", "f1"]) $(`tune-${o}`).addEventListener("click", () => tune(o));
  for (const o of ["sensitivity", "specificity"]) $(`tune-${o}`).addEventListener("click", () => tune(`${o}:${$(`target-${o}`).value}`));
  $("use-report").addEventListener("click", () => R.data.tuned && apply(R.data.tuned, R.data.tuned.objective));
  $("gallery-class").addEventListener("change", renderGallery);
  $("save").addEventListener("click", save);
  dragging();
}

async function init() {
  const d = await vg.json("/api/report");
  if (!d.available) { vg.status($("status"), `No report to show: ${d.reason}.`, true); return; }
  R.data = d;
  const ts = d.curve.threshold;
  R.span = [ts[0], ts[ts.length - 1]];
  const slider = $("global-threshold");
  slider.min = R.span[0]; slider.max = R.span[1]; slider.step = (R.span[1] - R.span[0]) / 2000;
  $("summary").replaceChildren(vg.el("div", { text: `Report ${d.folder}: split ${d.split}, ${d.image_ids.length} images, ` +
    `${d.classes.length} classes, score ${d.score}, ${d.templates} prompts. mAP ${vg.fmt(d.mAP)} (chance ${vg.fmt(d.chance_mean)}). ` +
    `Save writes ${d.save_path}.` }));
  $("gallery-class").replaceChildren(...d.classes.map((c) => vg.el("option", { text: c, value: c })));
  $("gallery-note").textContent = d.gallery_note;
  wire();
  if (d.tuned) apply(d.tuned, d.tuned.objective);
  else { R.global = (R.span[0] + R.span[1]) / 2; for (const c of d.classes) R.perClass[c] = R.global; update(); }
}

init().catch((e) => vg.status($("status"), e.message, true));
