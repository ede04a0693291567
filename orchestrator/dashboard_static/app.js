// The Switchyard dashboard: a page per hash route, every figure from the controller's API with the
// user's bearer token (kept in this tab's sessionStorage). Text from the API is always set as text,
// never parsed as HTML.
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

function pendingText(p) {
  if (!p) return "";
  return `waiting for ${p.waiting_for || "?"}: ${p.reason || ""}`;
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

// ------------------------------------------------------------------ cluster

async function clusterPage() {
  const gen = app.gen;
  const root = h("div", {id: "cluster-page"});
  show(h("h1", {}, "Cluster"), root);
  const draw = async () => {
    const c = await api("/cluster");
    if (!alive(gen)) return;
    const ctl = c.controller || {};
    const nodes = c.nodes || [];
    const sum = k => nodes.reduce((a, n) => [a[0] + (n.free[k] || 0), a[1] + (n.total[k] || 0)], [0, 0]);
    const [cf, ct] = sum("CPU"), [gf, gt] = sum("GPU");
    root.replaceChildren(
      card("Controller", h("div", {class: "kv", id: "controller"},
        h("div", {}, h("span", {}, "state"), ctl.alive ? stateBadge("RUNNING") : stateBadge("FAILED"),
          ctl.alive ? "" : " not running"),
        h("div", {}, h("span", {}, "pid"), fmt(ctl.pid)),
        h("div", {}, h("span", {}, "heartbeat"), ago(ctl.heartbeat)),
        h("div", {}, h("span", {}, "running"), String((c.running || []).length)),
        h("div", {}, h("span", {}, "queued"), h("a", {href: "#/queue"}, String((c.queued || []).length))),
        h("div", {}, h("span", {}, "CPUs free"), `${fmt(cf)} / ${fmt(ct)}`),
        h("div", {}, h("span", {}, "GPUs free"), `${fmt(gf)} / ${fmt(gt)}`))),
      card("Nodes", c.nodes === undefined ? h("p", {class: "muted"}, "the API is not inside the controller: no node view")
        : table(["node", "address", "CPUs free / total", "", "GPUs free / total"], nodes.map(n => tr([
          h("code", {title: n.node}, short(n.node)), n.address || "–",
          `${fmt(n.free.CPU)} / ${fmt(n.total.CPU)}`,
          h("div", {class: "bar", title: "CPUs in use"},
            h("div", {style: `width:${n.total.CPU ? 100 * (1 - n.free.CPU / n.total.CPU) : 0}%`})),
          `${fmt(n.free.GPU)} / ${fmt(n.total.GPU)}`])), {id: "nodes"})),
      card("Running", table(["job", "name", "state", "priority", "owner", "step", "workers"],
        (c.running || []).map(r => tr([jobLink(r.id), r.name, stateBadge(r.state), fmt(r.priority),
                                       r.owner || "–", fmt(r.step), fmt((r.resources || {}).workers)])))),
      card("Teams", table(["team", "settings"], Object.entries(c.teams || {}).map(([name, t]) => tr([name,
        h("td", {class: "wrap"}, Object.entries(t).map(([k, v]) => `${k}: ${Array.isArray(v) ? v.join(", ") : fmt(v)}`)
          .join("  ·  "))])))),
      card("Preemption policy", h("div", {class: "kv"}, Object.entries(c.preemption || {}).map(([k, v]) =>
        h("div", {}, h("span", {}, k), fmt(v))))));
  };
  await draw();
  every(4000, draw);
}

// ------------------------------------------------------------------ queue

async function queuePage() {
  const gen = app.gen;
  const root = h("div", {id: "queue-page"});
  show(h("h1", {}, "Queue"), root);
  const draw = async () => {
    const q = await api("/dashboard/queue");
    if (!alive(gen)) return;
    root.replaceChildren(
      card("Waiting", table(["#", "job", "name", "priority", "owner", "waiting for", "why", "preempted by"],
        q.queued.map((r, i) => tr([fmt((r.pending || {}).position || i + 1), jobLink(r.id), r.name, fmt(r.priority),
          `${r.owner || "–"}${r.team ? ` (${r.team})` : ""}`,
          (r.pending || {}).waiting_for || "–",
          h("td", {class: "wrap pending-reason"}, (r.pending || {}).reason || "not looked at yet"),
          r.preempted_by ? jobLink(r.preempted_by) : "–"], {"data-job": r.id})), {id: "queued"})),
      card("Running", table(["job", "name", "state", "priority", "owner", "step", "restarts", "preemptions"],
        q.running.map(r => tr([jobLink(r.id), r.name, stateBadge(r.state), fmt(r.priority), r.owner || "–",
          fmt(r.step), fmt(r.restarts), fmt(r.preemptions)], {"data-job": r.id})), {id: "running"})),
      card("Preemptions", table(["when", "job", "owner", "now", "preempted by", "reason"],
        q.preemptions.map(p => tr([clock(p.at), jobLink(p.id, p.name), p.owner || "–", stateBadge(p.state),
          jobLink(p.by), h("td", {class: "wrap"}, p.reason)])), {id: "preemptions"})));
  };
  await draw();
  every(2000, draw);
}

// ------------------------------------------------------------------ jobs

async function jobsPage() {
  const gen = app.gen;
  const filter = h("input", {id: "filter", placeholder: "filter by id, name, owner, state"});
  const root = h("div", {});
  show(h("h1", {}, "Jobs"), h("div", {class: "toolbar"}, filter), root);
  let jobs = [];
  const draw = () => {
    const f = filter.value.trim().toLowerCase();
    const rows = jobs.slice().reverse().filter(j => !f || [j.id, j.name, j.owner, j.state, j.kind]
      .some(v => String(v || "").toLowerCase().includes(f)));
    root.replaceChildren(card(null, table(["job", "name", "kind", "state", "priority", "owner", "step", "submitted"],
      rows.map(j => tr([j.kind === "pipeline" ? h("a", {href: `#/pipeline/${j.id}`}, j.id) : jobLink(j.id), j.name,
        j.kind, stateBadge(j.state), fmt(j.priority), j.owner || "–", fmt(j.step), when(j.submitted_at)])),
      {id: "jobs"})));
  };
  filter.addEventListener("input", draw);
  const load = async () => { jobs = await api("/jobs"); if (alive(gen)) draw(); };
  await load();
  every(5000, load);
}

// ------------------------------------------------------------------ one job

const CURVES = [
  {key: "loss", title: "loss", id: "chart-loss"},
  {key: "lr", title: "learning rate", id: "chart-lr"},
  {key: "tokens_per_s", title: "tokens / s", id: "chart-tokens_per_s", zeroY: true},
  {key: "mfu", title: "MFU", id: "chart-mfu", zeroY: true,
   empty: "no MFU: the cluster has no peak FLOP/s for its devices"},
];

function timeline(job) {
  const NS = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(NS, "svg");
  const W = 1000, H = 72;
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  svg.setAttribute("class", "timeline chart");
  svg.id = "timeline";
  const hist = job.history || [];
  if (!hist.length) return svg;
  const t0 = hist[0].ts, t1 = TERMINAL.has(job.state) ? hist[hist.length - 1].ts : Date.now() / 1000;
  const span = Math.max(t1 - t0, 1e-3), x = t => 10 + (t - t0) / span * (W - 20);
  const add = (tag, attrs, text) => {
    const e = document.createElementNS(NS, tag);
    for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, String(v));
    if (text !== undefined) e.textContent = text;
    svg.appendChild(e);
    return e;
  };
  let events = 0, lastLabel = -1e9;
  hist.forEach((hh, i) => {
    const end = i + 1 < hist.length ? hist[i + 1].ts : t1;
    const rect = add("rect", {x: x(hh.ts), y: 8, width: Math.max(x(end) - x(hh.ts), 2), height: 18,
                              fill: STATE_COLORS[hh.to] || "#999", class: "segment", "data-state": hh.to});
    const title = document.createElementNS(NS, "title");
    title.textContent = `${hh.to} at ${clock(hh.ts)}: ${hh.reason}`;
    rect.appendChild(title);
    if (hh.to === "RESTARTING" || hh.to === "PREEMPTED") {
      // Labels close together go on alternate rows.
      const row = x(hh.ts) - lastLabel < 70 ? (events + 1) % 2 : 0;
      events = row;
      lastLabel = x(hh.ts);
      add("line", {x1: x(hh.ts), x2: x(hh.ts), y1: 4, y2: 32 + 11 * row, stroke: "#1d2330", "stroke-width": 1.5,
                   class: `event ${hh.to}`});
      add("text", {x: x(hh.ts) + 2, y: 40 + 11 * row}, hh.to === "RESTARTING" ? "restart" : "preempted");
    }
  });
  add("text", {x: 10, y: H - 4}, clock(t0));
  add("text", {x: W - 10, y: H - 4, "text-anchor": "end"}, TERMINAL.has(job.state) ? clock(t1) : "now");
  return svg;
}

async function jobPage(id) {
  const gen = app.gen;
  let job = await api(`/jobs/${encodeURIComponent(id)}`);
  if (job.kind === "pipeline") { location.replace(`#/pipeline/${encodeURIComponent(job.id)}`); return; }
  if (job.kind === "sweep") { location.replace(`#/sweep/${encodeURIComponent(job.name)}`); return; }
  const head = h("div", {id: "job-head"});
  const timelineCard = card("State timeline");
  const charts = h("div", {class: "grid", id: "charts"});
  const chartObjs = {};
  for (const c of CURVES) {
    const box = card(null);
    charts.appendChild(box);
    chartObjs[c.key] = SyChart.create(box, {title: c.title, xLabel: "step", id: c.id, zeroY: c.zeroY, empty: c.empty});
  }
  const evalsCard = card("Evaluations");
  const workersCard = card("Workers");
  const rankSelect = h("select", {id: "log-rank"}, h("option", {value: ""}, "all ranks"));
  const follow = h("input", {type: "checkbox", id: "log-follow", checked: true});
  const logPre = h("pre", {id: "log"});
  const logsCard = card("Logs", h("div", {class: "toolbar"}, rankSelect, h("label", {}, follow, " follow")), logPre);
  const stagesCard = h("div", {});
  show(head, timelineCard, h("div", {class: "card"}, h("h2", {}, "Curves"), charts), evalsCard, workersCard,
       stagesCard, logsCard);

  let lastUpdate = null;
  const drawJob = () => {
    if (job.updated_at === lastUpdate) return;
    lastUpdate = job.updated_at;
    const mine = app.me.admin || app.me.user === job.owner;
    const cancel = h("button", {id: "cancel", class: "danger", type: "button",
                                disabled: !mine || TERMINAL.has(job.state) || job.cancel_requested,
                                title: mine ? "" : `only ${job.owner || "its owner"} or an admin may cancel this job`},
                     job.cancel_requested && !TERMINAL.has(job.state) ? "cancelling…" : "Cancel job");
    const confirmBox = h("span", {id: "cancel-confirm", hidden: true}, " cancel this job? ",
      h("button", {id: "cancel-yes", class: "danger solid", type: "button", onclick: doCancel}, "Yes, cancel it"), " ",
      h("button", {type: "button", onclick: () => { confirmBox.hidden = true; }}, "No"));
    cancel.addEventListener("click", () => { confirmBox.hidden = false; });
    const m = job.metrics || {};
    head.replaceChildren(
      h("h1", {}, `${job.name} `, h("span", {class: "muted"}, job.id), " ", stateBadge(job.state)),
      card(null, h("div", {class: "kv"},
        h("div", {}, h("span", {}, "owner"), `${job.owner || "–"}${job.team ? ` (${job.team})` : ""}`),
        h("div", {}, h("span", {}, "kind"), job.kind),
        h("div", {}, h("span", {}, "priority"), fmt(job.priority)),
        h("div", {}, h("span", {}, "step"), h("b", {id: "job-step"}, fmt(job.step))),
        h("div", {}, h("span", {}, "restarts"), `${fmt(job.restarts)} / ${fmt(job.max_restarts)}`),
        h("div", {}, h("span", {}, "preemptions"), fmt(job.preemptions),
          job.preempted_by ? [" by ", jobLink(job.preempted_by)] : ""),
        h("div", {}, h("span", {}, "loss"), fmt(m.loss)),
        h("div", {}, h("span", {}, "submitted"), when(job.submitted_at)),
        job.after && job.after.length ? h("div", {}, h("span", {}, "after"), job.after.map(a => [jobLink(a), " "])) : null,
        job.parent_id ? h("div", {}, h("span", {}, "part of"), jobLink(job.parent_id)) : null),
        job.state === "QUEUED" && job.pending ? h("p", {id: "job-pending"},
          `#${job.pending.position} in the queue, ${pendingText(job.pending)}`) : null,
        job.reason && TERMINAL.has(job.state) ? h("p", {class: job.state === "SUCCEEDED" ? "muted" : "error"},
          job.reason) : null,
        h("p", {class: "toolbar"}, cancel, confirmBox, h("span", {id: "cancel-message", class: "error"})),
        h("p", {class: "note"}, `run dir: ${job.run_dir}`)));
    timelineCard.replaceChildren(h("h2", {}, "State timeline"), timeline(job),
      h("div", {class: "legend"}, Object.entries(STATE_COLORS).map(([s, c]) =>
        h("span", {}, h("i", {style: `background:${c}`}), s))),
      table(["time", "from", "to", "why"], (job.history || []).map(hh => tr([clock(hh.ts), hh.from || "–",
        stateBadge(hh.to), h("td", {class: "wrap"}, hh.reason)])), {id: "history"}));
    const best = job.best_checkpoint;
    const extras = [...new Set((job.evals || []).flatMap(e => Object.keys(e.extra || {})))].filter(k => k !== "tokens");
    evalsCard.replaceChildren(h("h2", {}, "Evaluations"),
      h("p", {id: "best-checkpoint"}, "best checkpoint: ", best ? h("code", {}, best) : "none yet"),
      table(["step", "checkpoint", "loss", "perplexity", ...extras, ""],
        (job.evals || []).slice().sort((a, b) => a.step - b.step).map(e => tr([fmt(e.step),
          h("code", {title: e.checkpoint}, String(e.checkpoint).split("/").pop()), fmt(e.loss), fmt(e.perplexity),
          ...extras.map(k => fmt((e.extra || {})[k])), e.checkpoint === best ? "★ best" : ""],
          {class: e.checkpoint === best ? "best" : ""})), {id: "evals"}));
    const wkeys = [...new Set((job.workers || []).flatMap(w => Object.keys(w)))];
    workersCard.replaceChildren(h("h2", {}, "Workers"),
      table(wkeys.length ? wkeys : ["rank"], (job.workers || []).map(w => tr(wkeys.map(k =>
        k === "node" ? h("code", {title: w[k]}, short(w[k])) : w[k] === undefined ? "–" : String(w[k])))), {id: "workers"}));
    if (job.stages) {
      stagesCard.replaceChildren(card("Stages", table(["job", "name", "state", "step"], job.stages.map(s =>
        tr([jobLink(s.id), s.name, stateBadge(s.state), fmt(s.step)])))));
    }
  };

  async function doCancel() {
    document.getElementById("cancel-confirm").hidden = true;
    const msg = document.getElementById("cancel-message");
    try {
      job = await api(`/jobs/${encodeURIComponent(job.id)}/cancel`, {method: "POST"});
      lastUpdate = null;
      drawJob();
      document.getElementById("cancel-message").textContent = "";
    } catch (e) {
      if (!(e instanceof AuthError)) msg.textContent = e.message;
    }
  }

  // Curves: rows since the last step seen, from the byte offset the server gave.
  const rows = [];
  let since = 0, offset = 0;
  const drawCurves = () => {
    for (const c of CURVES) {
      const pts = rows.filter(r => typeof r[c.key] === "number").map(r => [r.step, r[c.key]]);
      chartObjs[c.key].setData(pts.length ? [{name: c.key, points: pts}] : []);
    }
  };
  const loadMetrics = async () => {
    const got = await api(`/dashboard/jobs/${encodeURIComponent(job.id)}/metrics?since=${since}&offset=${offset}`);
    if (!alive(gen)) return;
    offset = got.offset;
    if (got.rows.length) {
      rows.push(...got.rows);
      since = got.last_step;
      drawCurves();
    }
  };

  // Logs: the tail, then what follows, from the cursor the server gave.
  let cursor = null, lines = [];
  const loadLogs = async (reset) => {
    if (reset) { cursor = null; lines = []; }
    const rank = rankSelect.value;
    const q = `?rank=${rank}` + (cursor ? `&cursor=${encodeURIComponent(JSON.stringify(cursor))}` : "");
    const got = await api(`/dashboard/jobs/${encodeURIComponent(job.id)}/logs${q}`);
    if (!alive(gen) || rank !== rankSelect.value) return;
    cursor = got.cursor;
    const have = [...rankSelect.options].map(o => o.value);
    for (const r of got.ranks) {
      if (!have.includes(String(r))) rankSelect.appendChild(h("option", {value: String(r)}, `rank ${r}`));
    }
    if (!got.lines.length && !reset) return;
    lines = lines.concat(got.lines).slice(-3000);
    const atEnd = logPre.scrollTop + logPre.clientHeight >= logPre.scrollHeight - 20;
    logPre.textContent = lines.join("\n");
    if (follow.checked && (atEnd || reset)) logPre.scrollTop = logPre.scrollHeight;
  };
  rankSelect.addEventListener("change", () => loadLogs(true));

  drawJob();
  await Promise.all([loadMetrics(), loadLogs(true)]);
  drawCurves();
  let finalRounds = 2;  // after the job ends, a last look at what its end flushed
  every(1500, async () => {
    if (TERMINAL.has(job.state) && finalRounds-- <= 0) return;
    job = await api(`/jobs/${encodeURIComponent(job.id)}`);
    if (!alive(gen)) return;
    drawJob();
    await loadMetrics();
    if (follow.checked) await loadLogs(false);
  });
}

// ------------------------------------------------------------------ pipelines

async function pipelinesPage() {
  const list = await api("/dashboard/pipelines");
  show(h("h1", {}, "InstructGPT pipelines"), card(null, table(["pipeline", "name", "state", "priority", "owner",
    "submitted"], list.map(p => tr([h("a", {href: `#/pipeline/${p.id}`}, p.id), p.name, stateBadge(p.state),
    fmt(p.priority), p.owner || "–", when(p.submitted_at)])), {id: "pipelines"})));
}

async function pipelinePage(id) {
  const gen = app.gen;
  const root = h("div", {id: "pipeline-page"});
  show(root);
  const draw = async () => {
    const p = await api(`/jobs/${encodeURIComponent(id)}`);
    if (!alive(gen)) return p;
    const r = p.report;
    const stageKeys = [...new Set((p.stages || []).flatMap(s => Object.keys(s.metrics || {})))];
    const kids = [
      h("h1", {}, `${p.name} `, h("span", {class: "muted"}, p.id), " ", stateBadge(p.state)),
      card("Stages", table(["stage", "job", "state", "step", ...stageKeys], (p.stages || []).map(s => tr([
        s.stage, s.id ? jobLink(s.id, s.name) : s.name, stateBadge(s.state), fmt(s.step),
        ...stageKeys.map(k => fmt((s.metrics || {})[k]))], {"data-stage": s.stage})), {id: "stages"}),
        h("p", {class: "note"}, `pipeline dir: ${p.pipeline_dir || p.run_dir}`)),
    ];
    if (!r) {
      kids.push(card("Report", h("p", {class: "muted", id: "report"},
        TERMINAL.has(p.state) ? "no report" : "the report comes once the PPO stage has finished")));
    } else {
      const pols = Object.entries(r.policies || {});
      const fams = Object.entries(r.gold_by_family || {});
      const ORDER = ["sft", "ppo", "ema"];
      const rank = n => (ORDER.indexOf(n) + 1) || ORDER.length + 1;
      pols.sort(([a], [b]) => rank(a) - rank(b));
      const polNames = pols.map(([n]) => n);
      kids.push(card("Report", h("div", {class: "figures", id: "report"},
          h("div", {}, h("div", {class: "label"}, "RM held-out accuracy"),
            h("div", {class: "figure", id: "rm-accuracy"}, pct(r.rm_heldout_accuracy)),
            h("div", {class: "note"}, `${fmt(r.rm_heldout_comparisons)} comparisons, loss ${fmt(r.rm_heldout_loss)}`)),
          h("div", {}, h("div", {class: "label"}, "PPO win-rate over SFT"),
            h("div", {class: "figure", id: "win-rate"}, pct(r.ppo_win_rate_vs_sft)),
            h("div", {class: "note"}, `${fmt(r.gold_prompts)} prompts judged`)),
          r.ema_win_rate_vs_sft !== undefined ? h("div", {}, h("div", {class: "label"}, "EMA win-rate over SFT"),
            h("div", {class: "figure"}, pct(r.ema_win_rate_vs_sft))) : null,
          h("div", {}, h("div", {class: "label"}, "KL of PPO to SFT (nats/seq)"),
            h("div", {class: "figure", id: "kl"}, fmt(((r.policies || {}).ppo || {}).kl)))),
        r.gold_note ? h("p", {class: "note"}, r.gold_note) : null),
        h("div", {class: "grid"},
          card("Policies", table(["policy", "gold score", "RM reward", "KL to SFT (nats)"], pols.map(([n, v]) =>
            tr([n, fmt(v.gold), fmt(v.reward), fmt(v.kl)])), {id: "policies"})),
          card("Gold score per instruction family", table(["family", "prompts", ...polNames], fams.map(([f, v]) =>
            tr([f, fmt(v.prompts), ...polNames.map(n => fmt(v[n]))])), {id: "families"}))));
    }
    root.replaceChildren(...kids);
    return p;
  };
  const p = await draw();
  if (!TERMINAL.has(p.state)) every(3000, draw);
}

// ------------------------------------------------------------------ sweeps

async function sweepsPage() {
  const list = await api("/dashboard/sweeps");
  show(h("h1", {}, "Scaling-law sweeps"), card(null, table(["sweep", "state", "runs", "jobs", "owner", "submitted"],
    list.map(s => tr([h("a", {href: `#/sweep/${encodeURIComponent(s.name)}`}, s.name), stateBadge(s.state),
      fmt(s.runs), Object.entries(s.jobs).map(([k, v]) => `${v} ${k.toLowerCase()}`).join(", ") || "–",
      s.owner || "–", when(s.submitted_at)])), {id: "sweeps"})));
}

function interval(iv) {
  if (!iv) return "–";
  return `[${fmt(iv.low)}, ${fmt(iv.high)}]${String(iv.method || "").includes("widened") ? " (widened)" : ""}`;
}

function isoflopSeries(s) {
  const fit = s.fit_report || {};
  const budgets = ((fit.approach2 || {}).budgets) || [];
  const groups = {};
  for (const p of s.points) (groups[p.budget] = groups[p.budget] || []).push(p);
  const out = [];
  Object.keys(groups).map(Number).sort((a, b) => a - b).forEach((b, i) => {
    const color = SyChart.PALETTE[i % SyChart.PALETTE.length];
    const pts = groups[b].slice().sort((p, q) => p.n - q.n);
    const prof = budgets[b];
    const label = prof ? `C=${SyChart.fmt(prof.C)}` : `C≈${SyChart.fmt(pts[0].c)}`;
    out.push({name: label, color, points: pts.map(p => [p.n, p.loss]), line: false, dots: true, r: 3.5});
    if (prof && prof.coeffs_ln_n) {
      const [c2, c1, c0] = prof.coeffs_ln_n;
      const lo = Math.log(pts[0].n / 1.2), hi = Math.log(pts[pts.length - 1].n * 1.2), curve = [];
      for (let k = 0; k <= 60; k++) { const x = lo + (hi - lo) * k / 60; curve.push([Math.exp(x), c2 * x * x + c1 * x + c0]); }
      out.push({name: `${label} parabola`, color, points: curve, count: 0, width: 1.2});
      if (prof.n_opt && prof.loss_opt) {
        out.push({name: `${label} vertex`, color, points: [[prof.n_opt, prof.loss_opt]], line: false, marker: "star",
                  count: 0});
      }
    }
  });
  return out;
}

async function sweepPage(name) {
  const gen = app.gen;
  const root = h("div", {id: "sweep-page"});
  show(root);
  const draw = async () => {
    const s = await api(`/dashboard/sweeps/${encodeURIComponent(name)}`);
    if (!alive(gen)) return s;
    const fit = s.fit_report;
    const byName = {};
    for (const c of s.children) byName[c.name] = c;
    const chartBox = card("IsoFLOP curves: final loss against N per compute budget");
    const kids = [
      h("h1", {}, `sweep ${s.sweep} `, stateBadge(s.state)),
      card("Progress", h("div", {class: "kv", id: "sweep-progress"},
        h("div", {}, h("span", {}, "results"), h("b", {id: "sweep-results"}, `${s.results} / ${s.runs}`)),
        h("div", {style: "flex:1; max-width:320px"}, h("div", {class: "bar"},
          h("div", {style: `width:${s.runs ? 100 * s.results / s.runs : 0}%`}))),
        h("div", {}, h("span", {}, "jobs"), Object.entries(s.jobs).map(([k, v]) => `${v} ${k.toLowerCase()}`)
          .join(", ") || "–"),
        h("div", {}, h("span", {}, "owner"), s.owner || "–")),
        s.reason ? h("p", {class: "note"}, s.reason) : null,
        h("p", {class: "note"}, `sweep dir: ${s.sweep_dir}`)),
      chartBox,
    ];
    const chart = SyChart.create(chartBox, {title: "IsoFLOP profiles (stars: parabola vertices)", logX: true,
                                            width: 1100, height: 380, yTicks: 6,
                                            xLabel: "parameters N", id: "isoflop", empty: "no finished runs yet"});
    const series = isoflopSeries(s);
    chart.setData(series);
    chartBox.appendChild(h("div", {class: "legend"}, series.filter(x => x.dots).map(x =>
      h("span", {}, h("i", {style: `background:${x.color}`}), x.name))));
    if (s.points.length) chartBox.appendChild(h("p", {class: "note"}, `loss: ${s.points[0].loss_column}`));
    if (fit) {
      const a3 = fit.approach3 || {}, ivs = a3.intervals || {};
      const level = fit.bootstrap ? `${Math.round(100 * fit.bootstrap.level)}% interval` : "interval";
      const status = (a3.boundary || []).length ? `boundary solution: ${a3.boundary.join("; ")}`
        : `converged: ${a3.converged ? "yes" : "no"} (${a3.message || a3.status || ""})`;
      const exps = [["1", fit.approach1], ["2 (IsoFLOP)", fit.approach2], ["3 (parametric)", {
        a: a3.a, b: a3.b, intervals: ivs}]];
      kids.push(h("div", {class: "grid"},
        card("Approach 3: L(N, D) = E + A / N^α + B / D^β", table(["parameter", "value", level],
          ["E", "A", "B", "alpha", "beta"].map(k => tr([k, fmt(a3[k], 6), interval(ivs[k])], {"data-param": k})),
          {id: "law"}), h("p", {class: "note"}, status)),
        card("Compute-optimal exponents: N_opt ∝ C^a, D_opt ∝ C^b", table(["approach", "a", level, "b", level],
          exps.map(([n, v]) => v && v.a !== undefined ? tr([n, fmt(v.a, 4), interval((v.intervals || {}).a),
            fmt(v.b, 4), interval((v.intervals || {}).b)]) : tr([n, h("td", {colspan: 4, class: "muted wrap"},
            `skipped: ${(v || {}).skipped || "–"}`)])), {id: "exponents"}),
          fit.consistency ? h("p", {class: "note"}, fit.consistency.line) : null)));
    } else {
      kids.push(card("Fit", h("p", {class: "muted", id: "law"},
        `no fit yet: the controller fits the table once every run has ended (${s.results} of ${s.runs} in the table)`)));
    }
    kids.push(card("Runs", table(["run", "budget C", "N", "tokens", "steps", "job", "state"], (s.plan || []).map(r => {
      const job = byName[r.job_name];
      return tr([r.run_id, fmt(r.budget), fmt(r.n_params), fmt(r.tokens), fmt(r.steps), job ? jobLink(job.id) : "–",
                 job ? stateBadge(job.state) : "not submitted"]);
    }), {id: "runs"})));
    root.replaceChildren(...kids);
    return s;
  };
  const s = await draw();
  if (!TERMINAL.has(s.state)) every(5000, draw);
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
