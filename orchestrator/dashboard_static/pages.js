// Dashboard pages that list things: the cluster, the queue, jobs, pipelines and sweeps.
// Helpers (h, api, table, every, show …) are in app.js; pages only run once a route calls them.
"use strict";

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
          h("td", {class: "wrap pending-reason"}, ((r.pending || {}).reason || "not looked at yet")
            + (startsText(r.pending) ? ` (${startsText(r.pending)})` : "")),
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

const JOBS_PER_PAGE = 200;  // the store is read a page at a time (GET /jobs?limit=&page=), never whole

async function jobsPage() {
  const gen = app.gen;
  const filter = h("input", {id: "filter", placeholder: "filter this page by id, name, owner, state"});
  const newer = h("button", {id: "jobs-newer", type: "button"}, "‹ newer");
  const older = h("button", {id: "jobs-older", type: "button"}, "older ›");
  const where = h("span", {id: "jobs-page", class: "muted"});
  const root = h("div", {});
  show(h("h1", {}, "Jobs"), h("div", {class: "toolbar"}, filter, " ", newer, " ", older, " ", where), root);
  let got = {jobs: [], total: 0, page: 1, limit: JOBS_PER_PAGE}, page = 1;
  const draw = () => {
    const f = filter.value.trim().toLowerCase();
    const rows = got.jobs.slice().reverse().filter(j => !f || [j.id, j.name, j.owner, j.state, j.kind]
      .some(v => String(v || "").toLowerCase().includes(f)));
    const first = (got.page - 1) * got.limit;
    where.textContent = got.total ? `jobs ${fmt(first + 1)}–${fmt(first + got.jobs.length)} of ${fmt(got.total)}, ` +
      "the newest first" : "no jobs yet";
    newer.disabled = got.page <= 1;
    older.disabled = first + got.jobs.length >= got.total;
    root.replaceChildren(card(null, table(["job", "name", "kind", "state", "priority", "owner", "step", "submitted"],
      rows.map(j => tr([j.kind === "pipeline" ? h("a", {href: `#/pipeline/${j.id}`}, j.id) : jobLink(j.id), j.name,
        j.kind, stateBadge(j.state), fmt(j.priority), j.owner || "–",
        fmt(j.step) + (j.steps_total ? ` / ${fmt(j.steps_total)}` : ""), when(j.submitted_at)])),
      {id: "jobs"})));
  };
  filter.addEventListener("input", draw);
  const load = async () => {
    const want = page;
    const answer = await api(`/jobs?limit=${JOBS_PER_PAGE}&page=${want}`);
    if (alive(gen) && want === page) { got = answer; draw(); }
  };
  newer.addEventListener("click", () => { page = Math.max(1, page - 1); load(); });
  older.addEventListener("click", () => { page += 1; load(); });
  await load();
  every(5000, load);
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
