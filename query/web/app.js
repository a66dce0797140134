// blipsearch page: search by text or photo, thumbnail grid, lightbox.
// Every string from the index (paths, names, dates, errors) goes to the page
// through textContent or attributes set one by one, never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const PAGE = 40;

const state = {
  mode: null,    // {kind: "text", q} | {kind: "similar", id} | {kind: "image", blob}
  results: [],
  offset: 0,
  more: false,
  busy: false,
  lb: -1,        // lightbox index into results
};

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

function say(msg, kind) {
  const m = $("message");
  m.textContent = msg || "";
  m.className = kind || "";
  m.hidden = !msg;
}

function fmt(x, digits) {
  return x === null || x === undefined ? "–" : Number(x).toFixed(digits);
}

function basename(p) {
  const i = p.lastIndexOf("/");
  return i >= 0 ? p.slice(i + 1) : p;
}

async function api(url, init) {
  let r;
  try {
    r = await fetch(url, Object.assign({ credentials: "same-origin" }, init || {}));
  } catch (e) {
    throw new Error("the server cannot be reached (" + e.message + ")");
  }
  let body = null;
  try { body = await r.json(); } catch (e) { body = null; }
  if (r.status === 401) {
    $("token-form").hidden = false;
    throw new Error("this server needs a token");
  }
  if (!r.ok) throw new Error((body && body.error) || ("server error " + r.status));
  return body;
}

function filterParams() {
  const p = new URLSearchParams();
  const v = (id) => $(id).value.trim();
  if (v("f-under")) p.set("under", v("f-under"));
  if (v("f-after")) p.set("after", v("f-after"));
  if (v("f-before")) p.set("before", v("f-before"));
  if (v("f-ext")) p.set("ext", v("f-ext"));
  if (v("f-threshold") && state.mode && state.mode.kind === "text") p.set("threshold", v("f-threshold"));
  if ($("f-sort").value === "date") p.set("sort", "date");
  if (v("f-rerank") !== "") p.set("rerank", v("f-rerank"));
  return p;
}

async function refreshStatus() {
  try {
    const s = await api("/api/status");
    const parts = [s.count + (s.count === 1 ? " photo" : " photos"), "model " + s.model, s.precision];
    if (s.failed) parts.push(s.failed + " unreadable");
    if (s.indexer_running) parts.push("indexer running");
    $("status").textContent = parts.join(" · ");
    $("status").classList.toggle("indexing", !!s.indexer_running);
    return s;
  } catch (e) {
    $("status").textContent = "Status unavailable: " + e.message;
    return null;
  }
}

function noMatchText(res) {
  switch (res.reason) {
    case "empty_index": return "The index is empty: run blip-index on your photos first.";
    case "filters": return "No indexed photo matches these filters.";
    case "threshold": return "No photo reaches the minimum match probability. Lower it to see more.";
    default: return "No match.";
  }
}

async function run(reset) {
  if (!state.mode || state.busy) return;
  state.busy = true;
  if (reset) {
    state.results = [];
    state.offset = 0;
    $("grid").replaceChildren();
  }
  $("more").hidden = true;
  say("Searching…", "info");
  document.body.classList.add("busy");
  const p = filterParams();
  p.set("n", String(PAGE));
  p.set("offset", String(state.offset));
  try {
    let res;
    if (state.mode.kind === "text") {
      p.set("q", state.mode.q);
      res = await api("/api/search?" + p.toString());
    } else if (state.mode.kind === "similar") {
      res = await api("/api/similar/" + encodeURIComponent(state.mode.id) + "?" + p.toString());
    } else {
      const fd = new FormData();
      fd.append("file", state.mode.blob, state.mode.name || "photo");
      res = await api("/api/search/image?" + p.toString(), { method: "POST", body: fd });
    }
    say("");
    if (!res.results.length && state.offset === 0) say(noMatchText(res), "empty");
    for (const h of res.results) addResult(h);
    state.offset += res.results.length;
    state.more = res.more && res.results.length > 0;
    $("more").hidden = !state.more;
    if (res.truncated) say("The query was cut to BLIP's 35 tokens.", "info");
  } catch (e) {
    say("Search failed: " + e.message, "error");
  } finally {
    state.busy = false;
    document.body.classList.remove("busy");
  }
}

function addResult(h) {
  const i = state.results.length;
  state.results.push(h);
  const li = el("li", "hit");
  const b = el("button", "thumb");
  b.type = "button";
  b.dataset.index = String(i);
  const name = basename(h.path);
  b.setAttribute("aria-label", name + ", score " + fmt(h.score, 3));
  const img = el("img");
  img.loading = "lazy";
  img.alt = name;
  img.src = h.thumb;
  img.addEventListener("error", () => li.classList.add("broken"), { once: true });
  b.append(img);
  const info = el("div", "info");
  info.append(el("span", "name", name));
  const scores = "score " + fmt(h.score, 3) + (h.itm_prob === null ? "" : " · match " + fmt(h.itm_prob * 100, 1) + "%");
  info.append(el("span", "score", scores));
  info.append(el("span", "date", (h.taken_at || h.mtime || "").replace("T", " ")));
  info.append(el("span", "path", h.path));
  b.append(info);
  b.addEventListener("click", () => openLightbox(i));
  const more = el("button", "similar", "More like this");
  more.type = "button";
  more.addEventListener("click", () => similar(h.id));
  li.append(b, more);
  $("grid").append(li);
}

function similar(id) {
  closeLightbox();
  $("q").value = "";
  state.mode = { kind: "similar", id: id };
  run(true);
}

function openLightbox(i) {
  if (i < 0 || i >= state.results.length) return;
  state.lb = i;
  const h = state.results[i];
  const img = $("lb-img");
  img.src = h.thumb + "?size=1024";
  img.alt = basename(h.path);
  const cap = $("lb-caption");
  cap.replaceChildren(
    el("strong", null, basename(h.path)),
    el("span", null, " · score " + fmt(h.score, 3) + (h.itm_prob === null ? "" : " · match " + fmt(h.itm_prob * 100, 1) + "%")),
    el("span", null, " · " + (h.taken_at || h.mtime || "").replace("T", " ")),
    el("div", "path", h.path));
  $("lb-original").href = h.photo;
  $("lb-prev").disabled = i === 0;
  $("lb-next").disabled = i === state.results.length - 1;
  const lb = $("lightbox");
  if (lb.hidden) {
    lb.hidden = false;
    state.lbReturn = document.activeElement;
    $("lb-close").focus();
  }
}

function closeLightbox() {
  if ($("lightbox").hidden) return;
  $("lightbox").hidden = true;
  $("lb-img").removeAttribute("src");
  const back = document.querySelector('.thumb[data-index="' + state.lb + '"]') || state.lbReturn;
  state.lb = -1;
  if (back) back.focus();
}

function step(d) {
  const n = state.lb + d;
  if (n >= 0 && n < state.results.length) openLightbox(n);
  else if (d > 0 && state.more) run(false);
}

function searchImage(file) {
  if (!file) return;
  if (file.type && !file.type.startsWith("image/")) {
    say("That is not an image: " + file.name, "error");
    return;
  }
  $("q").value = "";
  state.mode = { kind: "image", blob: file, name: file.name };
  run(true);
}

function init() {
  $("search").addEventListener("submit", (e) => {
    e.preventDefault();
    const q = $("q").value.trim();
    if (!q) { say("Type what the photo shows.", "info"); return; }
    state.mode = { kind: "text", q: q };
    run(true);
  });
  $("more").addEventListener("click", () => run(false));
  $("file").addEventListener("change", (e) => { searchImage(e.target.files[0]); e.target.value = ""; });
  $("upload-label").addEventListener("keydown", (e) => {
    if (e.key === "Enter" || e.key === " ") { e.preventDefault(); $("file").click(); }
  });
  for (const id of ["f-under", "f-after", "f-before", "f-ext", "f-threshold", "f-sort", "f-rerank"])
    $(id).addEventListener("change", () => run(true));
  $("f-clear").addEventListener("click", () => {
    for (const id of ["f-under", "f-after", "f-before", "f-ext", "f-threshold"]) $(id).value = "";
    $("f-sort").value = "score";
    $("f-rerank").value = "16";
    run(true);
  });
  $("lb-close").addEventListener("click", closeLightbox);
  $("lb-prev").addEventListener("click", () => step(-1));
  $("lb-next").addEventListener("click", () => step(1));
  $("lb-similar").addEventListener("click", () => {
    const h = state.results[state.lb];
    if (h) similar(h.id);
  });
  $("lightbox").addEventListener("click", (e) => { if (e.target === $("lightbox")) closeLightbox(); });
  document.addEventListener("keydown", (e) => {
    if ($("lightbox").hidden) return;
    if (e.key === "Escape") { e.preventDefault(); closeLightbox(); }
    else if (e.key === "ArrowLeft") { e.preventDefault(); step(-1); }
    else if (e.key === "ArrowRight") { e.preventDefault(); step(1); }
    else if (e.key === "Tab") { // keep focus inside the dialog
      const f = Array.from($("lightbox").querySelectorAll("button:not([disabled]), a[href]"));
      const i = f.indexOf(document.activeElement);
      if (e.shiftKey && i <= 0) { e.preventDefault(); f[f.length - 1].focus(); }
      else if (!e.shiftKey && i === f.length - 1) { e.preventDefault(); f[0].focus(); }
    }
  });
  // drag and drop a photo anywhere
  let depth = 0;
  document.addEventListener("dragenter", (e) => { e.preventDefault(); depth++; $("drop").hidden = false; });
  document.addEventListener("dragleave", () => { if (--depth <= 0) { depth = 0; $("drop").hidden = true; } });
  document.addEventListener("dragover", (e) => e.preventDefault());
  document.addEventListener("drop", (e) => {
    e.preventDefault();
    depth = 0;
    $("drop").hidden = true;
    if (e.dataTransfer && e.dataTransfer.files.length) searchImage(e.dataTransfer.files[0]);
  });
  $("token-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    // the server checks the token and answers with an HttpOnly session cookie: no script keeps the token
    const t = $("token").value.trim();
    try {
      await api("/api/session", { method: "POST", headers: { Authorization: "Bearer " + t } });
    } catch (err) {
      say("The token was refused: " + err.message, "error");
      return;
    }
    $("token").value = "";
    $("token-form").hidden = true;
    say("");
    refreshStatus().then(() => run(true));
  });
  refreshStatus().then((s) => {
    if (s && s.count === 0) say("The index is empty: run blip-index on your photos first.", "empty");
  });
  setInterval(refreshStatus, 10000);
}

document.addEventListener("DOMContentLoaded", init);
