// The Switchyard dashboard: a page per hash route, every figure from the controller's API with the
// user's bearer token (kept in this tab's sessionStorage). Text from the API is always set as text,
// never parsed as HTML. This file holds the helpers, sign-in and routing; the pages are in pages.js
// (lists) and job.js (one job), loaded before it.
"use strict";

const API = "/api/v1";
const TOKEN_KEY = "switchyard-token";
const TERMINAL = new Set(["SUCCEEDED", "FAILED", "CANCELLED"]);
const STATE_COLORS = {QUEUED: "#8c95a6", STARTING: "#9fb3d9", RUNNING: "#1f9d55", RESTARTING: "#c98a00",
                      PREEMPTED: "#e0a020", SUCCEEDED: "#2f6fde", FAILED: "#d14343", CANCELLED: "#a33"};
const app = {me: null, gen: 0};

// ------------------------------------------------------------------ helpers

function h(tag, attrs, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else if (k === "class") e.className = v;
    else if (k === "style") e.style.cssText = v;  // CSSOM, which the page's CSP allows (a style attribute it would not)
    else e.setAttribute(k, v === true ? "" : String(v));
  }
  for (const kid of kids.flat()) {
    if (kid === undefined || kid === null || kid === false) continue;
    e.appendChild(kid instanceof Node ? kid : document.createTextNode(String(kid)));
  }
  return e;
}

function fmt(v, digits) {
  if (v === undefined || v === null || v === "") return "–";
  if (typeof v === "number") {
    if (Number.isInteger(v) && Math.abs(v) < 1e15) return v.toLocaleString("en-US");
    const a = Math.abs(v);
    if (a !== 0 && (a >= 1e6 || a < 1e-3)) return v.toExponential(digits || 3);
    return String(Number(v.toPrecision(digits || 4)));
  }
  return String(v);
}
const pct = v => (v === undefined || v === null) ? "–" : `${(100 * v).toFixed(1)}%`;
const when = ts => ts ? new Date(ts * 1000).toLocaleString() : "–";
const clock = ts => ts ? new Date(ts * 1000).toLocaleTimeString() : "–";
const short = s => s ? String(s).slice(0, 12) : "–";
// A duration for people, as the CLI writes it (packing.span): 45s, 90m, 12h, 30d.
const span = s => s < 120 ? `${Math.round(s)}s` : s < 7200 ? `${Math.round(s / 60)}m` :
  s < 172800 ? `${Math.round(s / 3600)}h` : `${Math.round(s / 86400)}d`;

function ago(ts) {
  if (!ts) return "–";
  const s = Math.max(0, Date.now() / 1000 - ts);
  if (s < 90) return `${Math.round(s)} s ago`;
  if (s < 5400) return `${Math.round(s / 60)} min ago`;
  return `${(s / 3600).toFixed(1)} h ago`;
}

const stateBadge = s => h("span", {class: `state ${s}`, "data-state": s}, s);
const jobLink = (id, text) => id ? h("a", {href: `#/job/${encodeURIComponent(id)}`}, text || id) : "–";

function table(headers, rows, attrs) {
  return h("table", attrs || {}, h("thead", {}, h("tr", {}, headers.map(t => h("th", {}, t)))),
           h("tbody", {}, rows.length ? rows : [h("tr", {}, h("td", {colspan: headers.length, class: "muted"},
                                                                    "none"))]));
}
const tr = (cells, attrs) => h("tr", attrs || {}, cells.map(c => c instanceof Node && c.tagName === "TD" ? c
                                                                            : h("td", {}, c)));
const card = (title, ...kids) => h("section", {class: "card"}, title ? h("h2", {}, title) : null, ...kids);

// When one of the queue's first jobs starts, as the time limits ahead give it (job_text.starts_text).
function startsText(p) {
  if (!p || !p.starts_by) return "";
  const left = p.starts_by - Date.now() / 1000;
  return left > 0 ? `starts within about ${span(left)}` : "should start at any moment";
}

function pendingText(p) {
  if (!p) return "";
  const starts = startsText(p);
  return `waiting for ${p.waiting_for || "?"}: ${p.reason || ""}` + (starts ? ` (${starts})` : "");
}

class AuthError extends Error {}

async function api(path, opts) {
  opts = opts || {};
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (!token) throw new AuthError("no token");
  const resp = await fetch(API + path, {method: opts.method || "GET",
                                        headers: {Authorization: `Bearer ${token}`, "Content-Type": "application/json"},
                                        body: opts.body ? JSON.stringify(opts.body) : undefined});
  let data = null;
  try { data = await resp.json(); } catch (e) { data = null; }
  if (resp.status === 401) {
    signOut((data && data.error) || "the server refused the token");
    throw new AuthError("unauthorized");
  }
  if (!resp.ok) {
    const err = new Error((data && data.error) || `HTTP ${resp.status}`);
    err.status = resp.status;
    throw err;
  }
  return data;
}

// A page's timers stop when another page is shown: each render bumps app.gen.
function every(ms, fn) {
  const gen = app.gen;
  const loop = async () => {
    if (gen !== app.gen) return;
    try { await fn(); } catch (e) { if (!(e instanceof AuthError)) console.warn(e); }
    if (gen === app.gen) setTimeout(loop, ms);
  };
  setTimeout(loop, ms);
}
const alive = gen => gen === app.gen;

// ------------------------------------------------------------------ sign in and routing

function signOut(message) {
  sessionStorage.removeItem(TOKEN_KEY);
  app.me = null;
  app.gen++;
  document.getElementById("top").hidden = true;
  document.getElementById("main").replaceChildren();
  document.getElementById("login").hidden = false;
  document.getElementById("login-error").textContent = message || "";
  document.getElementById("token").value = "";
}

async function signIn(token) {
  sessionStorage.setItem(TOKEN_KEY, token);
  try {
    app.me = await api("/whoami");
  } catch (e) {
    if (!(e instanceof AuthError)) signOut(`cannot reach the API: ${e.message}`);
    return;
  }
  document.getElementById("login").hidden = true;
  document.getElementById("top").hidden = false;
  document.getElementById("who").textContent = `${app.me.user}${app.me.admin ? " (admin)" : ""}`;
  route();
}

const ROUTES = [
  [/^#?\/?$/, "cluster", () => clusterPage()],
  [/^#\/queue$/, "queue", () => queuePage()],
  [/^#\/jobs$/, "jobs", () => jobsPage()],
  [/^#\/job\/(.+)$/, "jobs", m => jobPage(decodeURIComponent(m[1]))],
  [/^#\/pipelines$/, "pipelines", () => pipelinesPage()],
  [/^#\/pipeline\/(.+)$/, "pipelines", m => pipelinePage(decodeURIComponent(m[1]))],
  [/^#\/sweeps$/, "sweeps", () => sweepsPage()],
  [/^#\/sweep\/(.+)$/, "sweeps", m => sweepPage(decodeURIComponent(m[1]))],
];

async function route() {
  if (!app.me) return;
  app.gen++;
  const main = document.getElementById("main");
  main.replaceChildren(h("p", {class: "muted"}, "loading…"));
  const hash = location.hash || "#/";
  for (const [re, nav, page] of ROUTES) {
    const m = hash.match(re);
    if (!m) continue;
    for (const a of document.querySelectorAll("#nav a")) a.classList.toggle("active", a.dataset.page === nav);
    try {
      await page(m);
    } catch (e) {
      if (!(e instanceof AuthError)) main.replaceChildren(h("p", {class: "error", id: "page-error"}, e.message));
    }
    return;
  }
  main.replaceChildren(h("p", {class: "error"}, `no page ${hash}`));
}

function show(...kids) {
  document.getElementById("main").replaceChildren(...kids);
}

// ------------------------------------------------------------------ start

document.getElementById("login-form").addEventListener("submit", ev => {
  ev.preventDefault();
  const token = document.getElementById("token").value.trim();
  if (token) signIn(token);
});
document.getElementById("signout").addEventListener("click", () => signOut(""));
window.addEventListener("hashchange", route);
if (sessionStorage.getItem(TOKEN_KEY)) signIn(sessionStorage.getItem(TOKEN_KEY)); else signOut("");
