// The dashboard's page for one job: its timeline, live curves, evaluations, workers, log tail, priority, cancel
// and requeue.
// Helpers (h, api, table, every, show …) are in app.js.
"use strict";

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
  const headTitle = h("div", {});
  const headBody = h("div", {});
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
  // Outside what drawJob redraws (headBody): a number being typed survives the page's refreshes.
  const prioInput = h("input", {id: "priority-input", type: "number", min: "-1000000", max: "1000000", step: "1"});
  const prioSet = h("button", {id: "priority-set", type: "button", onclick: () => doPriority()}, "Set priority");
  const prioBar = h("p", {class: "toolbar", id: "priority-bar"}, h("label", {for: "priority-input"}, "new priority "),
    prioInput, " ", prioSet, " ", h("span", {id: "priority-message", class: "error"}));
  const head = h("div", {id: "job-head"}, headTitle,
                 card(null, headBody, prioBar, h("p", {class: "note"}, `run dir: ${job.run_dir}`)));
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
      h("button", {id: "cancel-yes", class: "danger solid", type: "button", onclick: () => doCancel(false)},
        "Yes, cancel it"), " ",
      job.state === "RUNNING" ? [h("button", {id: "cancel-checkpoint", class: "danger", type: "button",
        title: "its ranks finish the step and save a checkpoint first, so a requeue loses no step",
        onclick: () => doCancel(true)}, "Save a checkpoint, then cancel"), " "] : "",
      h("button", {type: "button", onclick: () => { confirmBox.hidden = true; }}, "No"));
    cancel.addEventListener("click", () => { confirmBox.hidden = false; });
    // A FAILED or CANCELLED job of its own goes back in the queue and resumes from its latest checkpoint.
    const requeue = (job.state === "FAILED" || job.state === "CANCELLED") && job.kind === "train" && !job.parent_id
      ? h("button", {id: "requeue", type: "button", disabled: !mine, onclick: doRequeue,
                     title: mine ? "queue it again: it resumes from its latest complete checkpoint"
                                 : `only ${job.owner || "its owner"} or an admin may requeue this job`}, "Requeue")
      : null;
    prioInput.disabled = prioSet.disabled = !mine || TERMINAL.has(job.state);
    prioSet.title = mine ? "" : `only ${job.owner || "its owner"} or an admin may change this job's priority`;
    if (document.activeElement !== prioInput) prioInput.value = String(job.priority);
    const m = job.metrics || {};
    headTitle.replaceChildren(
      h("h1", {}, `${job.name} `, h("span", {class: "muted"}, job.id), " ", stateBadge(job.state)));
    headBody.replaceChildren(...[  // replaceChildren would write a null as the text "null"
      h("div", {class: "kv"},
        h("div", {}, h("span", {}, "owner"), `${job.owner || "–"}${job.team ? ` (${job.team})` : ""}`),
        h("div", {}, h("span", {}, "kind"), job.kind),
        h("div", {}, h("span", {}, "priority"), fmt(job.priority)),
        h("div", {}, h("span", {}, "step"), h("b", {id: "job-step"}, fmt(job.step)),
          job.steps_total ? ` / ${fmt(job.steps_total)}` : ""),
        job.eta_s !== null && job.eta_s !== undefined ? h("div", {}, h("span", {}, "time left"),
          h("b", {id: "job-eta"}, `about ${span(job.eta_s)}`),
          job.limit_left_s !== null && job.limit_left_s !== undefined && job.limit_left_s < job.eta_s
            ? h("span", {id: "job-limit-left"}, `, its time limit stops it in about ${span(job.limit_left_s)}`)
            : null) : null,
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
        h("p", {class: "toolbar"}, cancel, confirmBox, requeue ? [" ", requeue] : "",
          h("span", {id: "cancel-message", class: "error"}))
    ].filter(Boolean));
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

  async function doPriority() {
    const msg = document.getElementById("priority-message");
    const value = Number(prioInput.value);
    msg.textContent = "";
    if (prioInput.value.trim() === "" || !Number.isInteger(value)) {
      msg.textContent = "priority: give a whole number from -1000000 to 1000000";
      return;
    }
    try {
      job = await api(`/jobs/${encodeURIComponent(job.id)}`, {method: "PATCH", body: {priority: value}});
      prioInput.blur();
      lastUpdate = null;
      drawJob();
    } catch (e) {
      if (!(e instanceof AuthError)) msg.textContent = e.message;
    }
  }

  async function doCancel(checkpoint) {
    document.getElementById("cancel-confirm").hidden = true;
    const msg = document.getElementById("cancel-message");
    try {
      job = await api(`/jobs/${encodeURIComponent(job.id)}/cancel`,
                      {method: "POST", body: checkpoint ? {checkpoint: true} : undefined});
      lastUpdate = null;
      drawJob();
      document.getElementById("cancel-message").textContent = "";
    } catch (e) {
      if (!(e instanceof AuthError)) msg.textContent = e.message;
    }
  }

  async function doRequeue() {
    const msg = document.getElementById("cancel-message");
    try {
      job = await api(`/jobs/${encodeURIComponent(job.id)}/requeue`, {method: "POST"});
      lastUpdate = null;
      drawJob();
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
