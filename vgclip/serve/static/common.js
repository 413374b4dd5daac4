// Shared helpers of the two pages (no framework, no CDN: everything is served by vgclip serve).
"use strict";

const vg = {
  /** fetch JSON; a non-2xx answer throws an Error carrying the server's one-line `detail`. */
  async json(url, options) {
    let response;
    try {
      response = await fetch(url, options);
    } catch (e) {
      // fetch rejects with a bare "Failed to fetch" when no answer came back: say what that usually means here.
      const big = options && options.body instanceof FormData ? " (or the upload was far over its size limit)" : "";
      throw new Error(`no answer from the server: is it still running${big}? (${e.message})`);
    }
    let body = null;
    try { body = await response.json(); } catch (e) { body = null; }
    if (!response.ok) {
      const detail = body && body.detail ? (typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail)) : response.statusText;
      throw new Error(`${response.status}: ${detail}`);
    }
    return body;
  },
  el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") node.className = v;
      else if (k === "text") node.textContent = v;
      else if (k.startsWith("data-")) node.setAttribute(k, v);
      else node[k] = v;
    }
    for (const c of children) node.append(c);
    return node;
  },
  fmt(x, digits = 3) { return x === null || x === undefined || Number.isNaN(x) ? "—" : Number(x).toFixed(digits); },
  /** The slider range of a score kind: probabilities in [0, 1], cosine similarities in [-1, 1]. */
  range(score) { return score === "cosine" ? [-1, 1] : [0, 1]; },
  status(node, text, isError) { node.textContent = text; node.classList.toggle("error", Boolean(isError)); },
};
