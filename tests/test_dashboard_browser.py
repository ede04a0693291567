"""The dashboard in a real headless browser (Debian's chromium driven by Playwright) against a live local
cluster: a real controller serving the API, a job training, another waiting for room.

Screenshots go to build/test-artifacts/dashboard/ (or $SWITCHYARD_TEST_ARTIFACTS). Without chromium
(`apt-get install chromium`; `make install` does it as root) or the playwright package the tests skip and
say which is missing. Every wait is for a state the page must reach; nothing here measures time.
"""
import os
import re
import shutil

import pytest

from orchestrator.cli_jobs import submit_spec
from orchestrator.cluster_config import ClusterConfig
from orchestrator.job_store import JobState, JobStore
from tests.conftest import tiny_spec, wait_for

pytestmark = [pytest.mark.ray, pytest.mark.e2e]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHROMIUM = os.environ.get("SWITCHYARD_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = os.environ.get("SWITCHYARD_TEST_ARTIFACTS", os.path.join(ROOT, "build", "test-artifacts", "dashboard"))
PAGE_MS = 60_000       # a page reaching a state it must reach
TRAINING_MS = 240_000  # the training job moving on (new steps, a checkpoint evaluated)


def _playwright():
    if not (os.path.exists(CHROMIUM) or shutil.which("chromium")):
        pytest.skip(f"no chromium at {CHROMIUM}: `apt-get install chromium` (make install does it as root) "
                    "to run the dashboard's browser tests")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the playwright package is missing: pip install -e '.[test]'")
    return sync_playwright


@pytest.fixture(scope="module")
def browser():
    sync_playwright = _playwright()
    os.makedirs(ARTIFACTS, exist_ok=True)
    with sync_playwright() as p:
        exe = CHROMIUM if os.path.exists(CHROMIUM) else shutil.which("chromium")
        b = p.chromium.launch(executable_path=exe, args=ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture(scope="module")
def live(ray_cluster, storage_root, tmp_path_factory, browser):
    """A controller serving the API and the dashboard; alice's job training and her second job waiting."""
    from orchestrator.controller import start_controller, stop_controller

    tmp = tmp_path_factory.mktemp("dash")
    cfg = ClusterConfig.model_validate({"storage": storage_root, "job_store": str(tmp / "jobs.db"),
                                        "ray": {"namespace": f"ctl-dash-{tmp.name}"},
                                        "api": {"listen": "127.0.0.1:0"}})
    store = JobStore(cfg.job_store)
    tokens = {u: store.create_token(u) for u in ("alice", "bob")}
    handle = start_controller(cfg, tick_s=0.3, backfill_window_s=120)
    import ray

    url = ray.get(handle.ping.remote())["api"]
    # Trains until cancelled: 2 of the head's 4 CPUs; a checkpoint (and its evaluation) every 10 steps.
    # Its hour's time limit tells the queue when the waiting job below can start at the latest, and comes before
    # its 100,000 steps do.
    train = submit_spec(cfg, tiny_spec(name="live", **{"train.steps": 100000, "checkpoint.every": 10,
                                                       "checkpoint.keep": 2, "resources.time_limit_s": 3600}),
                        priority=0, owner="alice")
    wait_for(lambda: store.get(train).state == JobState.RUNNING, timeout=300, what="the job RUNNING")
    # Needs all 4 CPUs: waits for capacity behind the running job.
    waiting = submit_spec(cfg, tiny_spec(name="big", **{"resources.workers": 2, "resources.cpus_per_worker": 2,
                                                        "resources.torch_threads": 1}), priority=0, owner="alice")
    yield {"cfg": cfg, "store": store, "url": url, "tokens": tokens, "train": train, "waiting": waiting}
    for job in (train, waiting):
        if not store.get(job).terminal:
            store.request_cancel(job)
    wait_for(lambda: all(store.get(j).terminal for j in (train, waiting)), timeout=120, what="jobs cancelled")
    stop_controller(cfg.ray.namespace)


def sign_in(browser, url, token):
    page = browser.new_page(viewport={"width": 1366, "height": 900})  # a laptop screen
    page.set_default_timeout(PAGE_MS)
    # Script errors and refused content (the page's CSP) fail the test in shot(); a refused request
    # (401, 403) the page itself made is no error of the page.
    page.errors = []
    page.on("pageerror", lambda err: page.errors.append(str(err)))
    page.on("console", lambda msg: msg.type == "error" and "Failed to load resource" not in msg.text
            and page.errors.append(msg.text))
    page.goto(f"{url}/dashboard/")
    page.fill("#token", token)
    page.click("#signin")
    page.wait_for_selector("#top:not([hidden])")
    return page


def shot(page, name):
    page.screenshot(path=os.path.join(ARTIFACTS, f"{name}.png"), full_page=True)
    assert not getattr(page, "errors", []), page.errors


def until(page, cond, timeout_ms, what):
    """Poll ``cond()`` from here (the page's CSP forbids the string eval of page.wait_for_function)."""
    for _ in range(timeout_ms // 500):
        if cond():
            return
        page.wait_for_timeout(500)
    raise AssertionError(f"the page never showed {what}")


def points(page, chart):
    return int(page.get_attribute(f"svg#{chart}", "data-points") or 0)


def test_no_token_or_a_bad_one_is_refused(live, browser):
    page = browser.new_page()
    page.set_default_timeout(PAGE_MS)
    page.goto(f"{live['url']}/dashboard/")
    assert page.is_visible("#login-form") and not page.is_visible("#top")
    # The page's own requests without a token, and with a wrong one: 401, no data.
    codes = page.evaluate("""async () => {
        const plain = await fetch('/api/v1/jobs');
        const wrong = await fetch('/api/v1/jobs', {headers: {Authorization: 'Bearer nope'}});
        return [plain.status, wrong.status, (await plain.json()).error];
    }""")
    assert codes[:2] == [401, 401] and "no token" in codes[2]
    page.fill("#token", live["tokens"]["alice"] + "x")
    page.click("#signin")
    page.wait_for_selector("#login-error:has-text('unknown, expired or revoked token')")
    assert not page.is_visible("#top") and page.inner_text("#main") == ""
    shot(page, "login-refused")
    page.close()


def test_cluster_page_shows_nodes_and_the_controller(live, browser):
    page = sign_in(browser, live["url"], live["tokens"]["alice"])
    page.wait_for_selector("#who:has-text('alice')")
    page.wait_for_selector("#nodes tbody tr td code")
    assert "RUNNING" in page.inner_text("#controller")
    assert "/ 4" in page.inner_text("#nodes")  # the head's 4 CPUs
    page.wait_for_selector(f"#cluster-page a[href='#/job/{live['train']}']")
    shot(page, "cluster")
    page.click("#nav a[data-page='jobs']")
    page.wait_for_selector(f"#jobs a[href='#/job/{live['train']}']")
    # A page of the store at a time (GET /jobs?limit=200&page=1), never the whole store.
    assert page.inner_text("#jobs-page") == "jobs 1–2 of 2, the newest first"
    assert page.is_disabled("#jobs-newer") and page.is_disabled("#jobs-older")
    assert "/ 100,000" in page.inner_text(f"#jobs tr:has(a[href='#/job/{live['train']}'])")
    page.fill("#filter", "big")
    page.wait_for_selector(f"#jobs a[href='#/job/{live['train']}']", state="detached")
    assert page.is_visible(f"#jobs a[href='#/job/{live['waiting']}']")
    shot(page, "jobs")
    page.close()


def test_queue_shows_why_a_job_waits(live, browser):
    page = sign_in(browser, live["url"], live["tokens"]["bob"])
    page.goto(f"{live['url']}/dashboard/#/queue")
    row = f"#queued tr[data-job='{live['waiting']}']"
    page.wait_for_selector(f"{row} td.pending-reason:not(:has-text('not looked at yet'))")
    reason = live["store"].get(live["waiting"]).pending
    cells = page.inner_text(row)
    assert reason["waiting_for"] in cells and reason["reason"][:30] in cells and "alice" in cells
    page.wait_for_selector(f"{row} td.pending-reason:has-text('(starts within about ')")
    assert re.search(r"\(starts within about (5\d|6[0-5])m\)", page.inner_text(row))  # 3600 s + a 300 s stop
    assert page.is_visible(f"#running tr[data-job='{live['train']}']")
    shot(page, "queue")
    page.close()


def test_job_page_curves_grow_while_it_trains(live, browser):
    page = sign_in(browser, live["url"], live["tokens"]["alice"])
    page.goto(f"{live['url']}/dashboard/#/job/{live['train']}")
    page.wait_for_selector("svg#chart-loss[data-points]:not([data-points='0'])")
    first = points(page, "chart-loss")
    # Without reloading, the same chart gains points as steps are logged.
    until(page, lambda: points(page, "chart-loss") > first, TRAINING_MS, "more points on the loss curve")
    assert points(page, "chart-lr") > 0 and points(page, "chart-tokens_per_s") > 0
    assert page.get_attribute("svg#chart-loss path.series", "d").count("L") >= first
    assert "RUNNING" in page.inner_text("#job-head") and page.is_enabled("#cancel")
    assert "null" not in page.inner_text("#job-head") and page.input_value("#priority-input") == "0"
    page.wait_for_selector("#job-eta:has-text('about ')")  # how far it is, and its time left at this rate
    page.wait_for_selector("#job-limit-left:has-text('its time limit stops it in about ')")  # 1 h, before that
    assert "/ 100,000" in page.inner_text("#job-head")
    assert page.locator("#timeline rect.segment[data-state='RUNNING']").count() >= 1
    assert page.locator("#workers tbody tr").count() == 2
    until(page, lambda: "[switchyard] rank" in page.inner_text("#log"), PAGE_MS, "the ranks' log lines")
    # A checkpoint gets evaluated: the table fills in and the best checkpoint is named.
    page.wait_for_selector("#evals tr.best", timeout=TRAINING_MS)
    # The page polls; the store may name a newer best a moment before the page shows it.
    until(page, lambda: (live["store"].get(live["train"]).best_checkpoint or "\0")
          in page.inner_text("#best-checkpoint"), PAGE_MS, "the store's best checkpoint on the page")
    shot(page, "job")
    page.close()


def test_cancel_from_the_page_only_for_your_own_job(live, browser):
    store, job = live["store"], live["waiting"]
    bob = sign_in(browser, live["url"], live["tokens"]["bob"])
    bob.goto(f"{live['url']}/dashboard/#/job/{job}")
    bob.wait_for_selector("#cancel")
    assert bob.is_disabled("#cancel") and "only alice" in bob.get_attribute("#cancel", "title")
    assert bob.is_disabled("#priority-set") and bob.is_disabled("#priority-input")
    # Forcing it from bob's page is refused by the server.
    code = bob.evaluate("""async ([id, token]) => (await fetch(`/api/v1/jobs/${id}/cancel`,
        {method: 'POST', headers: {Authorization: `Bearer ${token}`}})).status""", [job, live["tokens"]["bob"]])
    assert code == 403 and not store.get(job).cancel_requested
    shot(bob, "cancel-refused")
    bob.close()
    alice = sign_in(browser, live["url"], live["tokens"]["alice"])
    alice.goto(f"{live['url']}/dashboard/#/job/{job}")
    alice.wait_for_selector("#priority-set:not([disabled])")
    alice.fill("#priority-input", "2000000")  # out of range: the server's one line, nothing changed
    alice.click("#priority-set")
    alice.wait_for_selector("#priority-message:has-text('from -1000000 to 1000000')")
    assert store.get(job).priority == 0
    alice.fill("#priority-input", "-3")  # lower, so it cannot preempt the training job
    alice.click("#priority-set")
    until(alice, lambda: store.get(job).priority == -3, PAGE_MS, "the new priority stored")
    alice.wait_for_selector("#job-head .kv:has-text('priority-3')")
    assert alice.inner_text("#priority-message") == ""
    alice.click("#cancel:not([disabled])")
    alice.click("#cancel-yes")
    alice.wait_for_selector("#job-head .state[data-state='CANCELLED']")
    assert store.get(job).state == JobState.CANCELLED
    assert alice.is_disabled("#cancel") and alice.is_disabled("#priority-set")
    assert "null" not in alice.inner_text("#job-head") and "undefined" not in alice.inner_text("#job-head")
    assert store.get(job).reason == "cancelled by alice" and "cancelled by alice" in alice.inner_text("#history")
    shot(alice, "cancelled")
    alice.click("#requeue:not([disabled])")  # back in the queue, behind the training job again
    alice.wait_for_selector("#job-head .state[data-state='QUEUED']")
    assert store.get(job).state == JobState.QUEUED and "requeued by alice" in alice.inner_text("#history")
    assert not alice.is_disabled("#cancel") and alice.query_selector("#requeue") is None
    # The training job: its ranks save a checkpoint, then it is CANCELLED (the requeued job gets the room).
    train = live["train"]
    alice.goto(f"{live['url']}/dashboard/#/job/{train}")
    alice.click("#cancel:not([disabled])")
    alice.click("#cancel-checkpoint")
    alice.wait_for_selector("#job-head .state[data-state='CANCELLED']", timeout=TRAINING_MS)
    rec = store.get(train)
    assert rec.reason == f"cancelled by alice: stopped at step {rec.step} with a checkpoint", rec.reason
    assert "with a checkpoint" in alice.inner_text("#history") and alice.is_visible("#requeue")
    alice.close()


def test_the_jobs_page_reads_the_store_a_page_at_a_time(tmp_path, browser):
    """205 jobs: the newest 200 on the first page, the oldest 5 one click away (no controller needed)."""
    from orchestrator.api import serve_in_thread

    cfg = ClusterConfig.model_validate({"storage": str(tmp_path / "runs"), "job_store": str(tmp_path / "jobs.db")})
    store = JobStore(cfg.job_store)
    token = store.create_token("dana")
    ids = [store.submit(f"j{i}", "train", {}, 0, {"workers": 1, "cpus_per_worker": 1}, 0,
                        run_dir_for=lambda j: str(tmp_path / "runs" / j), owner="dana").id for i in range(205)]
    srv = serve_in_thread(cfg, "127.0.0.1:0")
    try:
        page = sign_in(browser, srv.url, token)
        page.goto(f"{srv.url}/dashboard/#/jobs")
        page.wait_for_selector("#jobs-page:has-text('of 205')")
        assert page.inner_text("#jobs-page") == "jobs 1–200 of 205, the newest first"
        assert page.locator("#jobs tbody tr").count() == 200 and page.is_visible(f"#jobs a[href='#/job/{ids[-1]}']")
        assert page.is_disabled("#jobs-newer") and not page.is_visible(f"#jobs a[href='#/job/{ids[0]}']")
        page.click("#jobs-older")
        page.wait_for_selector(f"#jobs a[href='#/job/{ids[0]}']")
        assert page.inner_text("#jobs-page") == "jobs 201–205 of 205, the newest first"
        assert page.locator("#jobs tbody tr").count() == 5 and page.is_disabled("#jobs-older")
        page.click("#jobs-newer")
        page.wait_for_selector(f"#jobs a[href='#/job/{ids[-1]}']")
        shot(page, "jobs-pages")
        page.close()
    finally:
        srv.stop()


def test_pipeline_and_sweep_pages(tmp_path, browser):
    """Pipeline and sweep records and files as real runs leave them (tests/dashboard_data.py), on an API
    server of their own: training a pipeline or a sweep for real takes many minutes."""
    from orchestrator.api import serve_in_thread
    from tests.dashboard_data import REPORT, make_pipeline, make_sweep

    cfg = ClusterConfig.model_validate({"storage": str(tmp_path / "runs"), "job_store": str(tmp_path / "jobs.db")})
    token = JobStore(cfg.job_store).create_token("carol")
    pid = make_pipeline(cfg, "igpt")
    sweep = make_sweep(cfg, "iso")
    srv = serve_in_thread(cfg, "127.0.0.1:0")
    try:
        page = sign_in(browser, srv.url, token)
        page.goto(f"{srv.url}/dashboard/#/pipelines")
        page.click(f"#pipelines a[href='#/pipeline/{pid}']")
        page.wait_for_selector("#rm-accuracy")
        assert page.inner_text("#rm-accuracy") == f"{100 * REPORT['rm_heldout_accuracy']:.1f}%"
        assert page.inner_text("#win-rate").startswith("75.") and page.inner_text("#kl") == "0.93"
        assert page.locator("#stages tr[data-stage] .state[data-state='SUCCEEDED']").count() == 3
        assert "reverse" in page.inner_text("#families") and "0.685" in page.inner_text("#policies")
        shot(page, "pipeline")
        page.goto(f"{srv.url}/dashboard/#/sweeps")
        page.click("#sweeps a[href='#/sweep/iso']")
        page.wait_for_selector("svg#isoflop[data-points='12']")
        assert page.locator("svg#isoflop circle.dot").count() == 12
        assert page.locator("svg#isoflop path.marker").count() == 3  # a vertex per budget
        assert page.locator("svg#isoflop path.series[data-name$='parabola']").count() == 3
        assert page.inner_text("#sweep-results") == "12 / 12"
        law = page.inner_text("#law tr[data-param='E']")
        assert law.startswith("E") and "[" in law  # value and its interval
        assert page.locator("#exponents tbody tr").count() == 3 and len(sweep["runs"]) == 12
        shot(page, "sweep")
        page.close()
    finally:
        srv.stop()


def test_timeline_shows_preemptions_and_restarts_and_mfu_is_drawn(tmp_path, browser):
    """A job preempted once and restarted once, with MFU in its metrics (a GPU cluster's rows), on an API
    server of its own."""
    import json

    from orchestrator.api import serve_in_thread
    from orchestrator.cli_jobs import submit_raw

    cfg = ClusterConfig.model_validate({"storage": str(tmp_path / "runs"), "job_store": str(tmp_path / "jobs.db")})
    store = JobStore(cfg.job_store)
    token = store.create_token("alice")
    raw = {"name": "gpujob", "model": {"family": "llama", "preset": "tiny"},
           "data": {"corpus": "builtin:stdlib", "seq_len": 64, "max_docs": 300},
           "train": {"steps": 4, "micro_batch": 4}, "resources": {"workers": 1, "cpus_per_worker": 1}}
    job, urgent = (submit_raw(cfg, {**raw, "name": n}, 0, [], owner="alice") for n in ("gpujob", "urgent"))
    for state in (JobState.STARTING, JobState.RUNNING):
        store.transition(job, state, state.value.lower())
    store.transition(job, JobState.PREEMPTED, f"preempted by {urgent}", preempted_by=urgent)
    for state, why in ((JobState.QUEUED, f"preempted by {urgent}; requeued"), (JobState.STARTING, "resources"),
                       (JobState.RUNNING, "all workers started"), (JobState.RESTARTING, "rank 1 died"),
                       (JobState.STARTING, "restart 1"), (JobState.RUNNING, "all workers started")):
        store.transition(job, state, why)
    run_dir = store.get(job).run_dir
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps({"step": s, "loss": 3.0 - s / 10, "lr": 1e-3, "tokens_per_s": 5e4, "mfu": 0.4})
                     + "\n" for s in range(1, 9))
    srv = serve_in_thread(cfg, "127.0.0.1:0")
    try:
        page = sign_in(browser, srv.url, token)
        page.goto(f"{srv.url}/dashboard/#/job/{job}")
        page.wait_for_selector("svg#chart-mfu[data-points='8']")
        assert points(page, "chart-loss") == 8
        assert page.locator("#timeline line.event.PREEMPTED").count() == 1
        assert page.locator("#timeline line.event.RESTARTING").count() == 1
        assert urgent in page.inner_text("#job-head") and "preempted by" in page.inner_text("#history")
        shot(page, "timeline")
        page.close()
    finally:
        srv.stop()
