"""The Ray dashboard as a user meets it, in a real headless browser (Debian's chromium + chromedriver,
driven by selenium), following the README's monitoring steps word for word:

1. run `softprompt tune ... run_name=my-first-run` (the README runs the demo config; this test runs
   the tiny test task, to stay fast); it prints "started a local Ray (dashboard URL; sign in ...)";
2. `ray get-auth-token` prints the token; open the URL and paste it into "Authentication Token Required";
3. Jobs → type the run's name into the Name filter → the run's job → Actor Table → a
   `RayTrainWorker`'s Log → the trial worker's log;
4. open `<run folder>/monitor.html`, the live view of our metrics.

`make test` installs chromium and chromium-driver (apt-get) when they are missing, so this test
fails rather than skips when they are absent; it skips, loudly, only where they cannot be installed
(not root, or no apt-get). SOFTPROMPT_SCREENSHOTS=docs writes the screenshots the README shows into
docs/ (otherwise into the test's temporary folder).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from conftest import TinyTask

pytestmark = pytest.mark.slow

RUN_NAME = "my-first-run"
"""The README's run name (the screenshots in docs/ show it)."""
REPO = Path(__file__).resolve().parents[2]


def _browser_or_reason() -> tuple[str, str] | None:
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium and driver:
        return chromium, driver
    if os.geteuid() == 0 and shutil.which("apt-get"):
        pytest.fail("chromium or chromedriver is missing: `make test` installs them (apt-get install chromium chromium-driver)")
    pytest.skip("SKIPPED LOUDLY: the dashboard browser test needs Debian's chromium and chromium-driver, and this "
                "user cannot install them (not root or no apt-get); install them and rerun")
    return None


class _Run:
    """A `softprompt tune` driver in its own process group, its output collected line by line."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.lines: list[str] = []
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, text: str, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if text in line:
                    return line
            if self.proc.poll() is not None:
                break
            time.sleep(0.5)
        raise AssertionError(f"no line with {text!r} after {timeout_s:.0f} s; output:\n" + "\n".join(self.lines[-60:]))

    def stop(self) -> None:
        """Ctrl-C (the driver and its local Ray shut down), then the whole process group if it lingers."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)


@pytest.fixture
def browser() -> tuple[str, str]:
    """Paths of chromium and chromedriver (checked before a run is started for nothing)."""
    return _browser_or_reason() or ("", "")


def _agent_port_held() -> int | None:
    """The dashboard agent's HTTP port when another process holds it. `ray.init` (Ray 2.60) cannot move
    it, so a second local Ray on the machine runs its agent without HTTP and its dashboard reads no logs."""
    from ray._private.ray_constants import DEFAULT_DASHBOARD_AGENT_LISTEN_PORT as port

    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the agent binds: a closed one's TIME_WAIT is no holder
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return port
    return None


@pytest.fixture
def running_sweep(browser: tuple[str, str], tiny_task: TinyTask, tmp_path: Path) -> Iterator[tuple[_Run, Path]]:
    """A one-trial sweep long enough to be looked at (stopped by the test), as a user would start it."""
    held = _agent_port_held()
    if held is not None:
        pytest.fail(f"port {held} (Ray's dashboard agent) is held by another Ray on this machine: the local Ray this test "
                    "starts would show no worker logs ('Failed to load'); stop that Ray (`ray stop`) and rerun")
    run_dir = tmp_path / RUN_NAME
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    args = [
        sys.executable, "-m", "softprompt.cli", "tune", "--data", str(tiny_task.data_dir), "--run-dir", str(run_dir), "--no-progress",
        *tiny_task.overrides, f"run_name={RUN_NAME}", "ray.num_workers=1", "tune.num_samples=1", "tune.scheduler=none",
        "train.steps=100000", "train.eval_every=200", "train.log_every=50",
    ]
    run = _Run(args, env)
    try:
        yield run, run_dir
    finally:
        run.stop()


def test_a_user_signs_in_finds_the_run_by_name_and_opens_a_trial_workers_log(
    browser: tuple[str, str], running_sweep: tuple[_Run, Path], tmp_path: Path
) -> None:
    from selenium import webdriver
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    from softprompt.ray import monitor

    chromium, chromedriver = browser
    run, run_dir = running_sweep
    shots = REPO / "docs" if os.environ.get("SOFTPROMPT_SCREENSHOTS") == "docs" else tmp_path

    # Step 1: the command says where the dashboard is and how to sign in, and never prints the token.
    started = run.wait_for("dashboard http://", timeout_s=180)
    assert "sign in with the token `ray get-auth-token` prints" in started, started
    url = started.split("dashboard ", 1)[1].split(";", 1)[0].rstrip(")")
    run.wait_for(" started (", timeout_s=180)  # the trial is running

    # Step 2: the token, as the README says to get it.
    ray_cli = Path(sys.executable).with_name("ray")
    token = subprocess.run([str(ray_cli), "get-auth-token"], capture_output=True, text=True, check=True, timeout=60).stdout.strip()
    assert token and not any(token in line for line in run.lines), "the token must not appear in the run's output"

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1500,1400"):
        options.add_argument(flag)
    chrome = webdriver.Chrome(service=Service(executable_path=chromedriver), options=options)
    wait = WebDriverWait(chrome, 60)

    def shot(name: str) -> None:
        chrome.save_screenshot(str(shots / name))

    def click_text(xpath: str) -> None:
        # The dashboard redraws its tables every few seconds: an element found may be replaced before the click.
        for attempt in range(3):
            try:
                element = wait.until(ec.element_to_be_clickable((By.XPATH, xpath)))
                chrome.execute_script("arguments[0].scrollIntoView({block: 'center'});", element)
                element.click()
                return
            except StaleElementReferenceException:
                if attempt == 2:
                    raise

    try:
        chrome.get(url)
        field = wait.until(ec.visibility_of_element_located((By.CSS_SELECTOR, "input[placeholder='Enter your authentication token']")))
        assert "Authentication Token Required" in chrome.page_source
        shot("dashboard-sign-in.png")
        field.send_keys(token)
        click_text("//button[normalize-space()='Submit']")
        wait.until(ec.invisibility_of_element_located((By.CSS_SELECTOR, "input[placeholder='Enter your authentication token']")))

        # Step 3: Jobs, filtered by the run's name; the run's job; its actors; a trial worker's log.
        click_text("//a[normalize-space()='Jobs']")
        name_filter = wait.until(ec.visibility_of_element_located((By.XPATH, "//label[normalize-space()='Name']/following::input[1]")))
        name_filter.send_keys(RUN_NAME, Keys.ENTER)
        row = f"//tr[td[normalize-space()='{RUN_NAME}']]"
        wait.until(ec.visibility_of_element_located((By.XPATH, row)),
                   f"no job named {RUN_NAME!r} on the Jobs page: the driver's ray.init must get softprompt.ray.dashboard.job_config")
        shot("dashboard-jobs.png")
        job_id = wait.until(ec.visibility_of_element_located((By.XPATH, f"{row}//a"))).text.strip()
        click_text(f"{row}//a")
        # The section's title (the innermost element with that text) expands it.
        click_text("//*[normalize-space()='Actor Table'][not(*[normalize-space()='Actor Table'])]")
        worker_row = "//tr[td[normalize-space()='RayTrainWorker'] and .//*[normalize-space()='ALIVE']]"  # the table refreshes itself
        wait.until(ec.visibility_of_element_located((By.XPATH, worker_row)))
        # The sweep's trial reprs as the run's name, so the actor table names the run too.
        wait.until(ec.visibility_of_element_located((By.XPATH, f"//tr[td[normalize-space()='ImplicitFunc'] and td[normalize-space()='{RUN_NAME}']]")),
                   f"no trial actor whose repr is {RUN_NAME!r}")
        table = chrome.find_element(By.XPATH, "//*[normalize-space()='Actor Table'][not(*[normalize-space()='Actor Table'])]")
        chrome.execute_script("arguments[0].scrollIntoView({block: 'start'});", table)
        shot("dashboard-job-actors.png")
        click_text(f"{worker_row}//a[normalize-space()='Log']")
        wait.until(lambda b: "/actors/" in b.current_url)
        # The actor's page opens on its log (stderr first), read from the worker's log file on its node:
        # Ray's header line names the job.
        wait.until(lambda b: "Class Name\nRayTrainWorker" in b.find_element(By.TAG_NAME, "body").text)
        deadline = reloaded = time.monotonic()
        deadline += 150
        while f":job_id:{job_id}" not in (body := chrome.find_element(By.TAG_NAME, "body").text):
            assert time.monotonic() < deadline, f"the worker's log did not show; the page read:\n{body[-3000:]}"
            time.sleep(3)
            if time.monotonic() - reloaded > 20:
                # The page reads the log once: a worker that had written nothing yet, or a fetch from the
                # node's agent that timed out on a busy machine ("Failed to load"), needs another read.
                chrome.refresh()
                reloaded = time.monotonic()
        shot("dashboard-worker-log.png")

        # Step 4: the live view of our own series, from the run folder.
        page = run_dir / "monitor.html"
        series = [name for name, _, _ in monitor.CHARTS]
        deadline = time.monotonic() + 90  # every series, the step time needing two reads of the histogram
        while time.monotonic() < deadline and not all(f"<td>{name}</td>" in (page.read_text() if page.is_file() else "") for name in series):
            time.sleep(2)
        chrome.get(page.as_uri())
        body = chrome.find_element(By.TAG_NAME, "body").text
        assert f"softprompt run {RUN_NAME}" in body and "live, reloads every" in body, body[:2000]
        latest = chrome.find_element(By.ID, "latest").text
        assert all(name in latest for name in series), latest
        shot("monitor-live-view.png")
    except Exception:
        chrome.save_screenshot(str(tmp_path / "failure.png"))  # what the browser showed when a step failed
        raise
    finally:
        chrome.quit()


def test_the_live_view_turns_rays_prometheus_text_into_series(tmp_path: Path) -> None:
    from softprompt.ray import monitor

    def scrape(count: float, total: float, loss: float) -> str:
        tags = 'Component="core_worker",SessionName="s",trial="trial-1",worker="0"'
        return "\n".join([
            "# HELP ray_softprompt_train_loss Training loss of the latest step.", "# TYPE ray_softprompt_train_loss gauge",
            f"ray_softprompt_train_loss{{{tags}}} {loss}",
            f'ray_softprompt_step_time_seconds_bucket{{{tags},le="0.1"}} {count}',
            f"ray_softprompt_step_time_seconds_sum{{{tags}}} {total}", f"ray_softprompt_step_time_seconds_count{{{tags}}} {count}",
            'ray_softprompt_trials{state="running"} 2', "ray_node_cpu_utilization 50",
        ])

    history = monitor.History(started=100.0)
    history.add(scrape(10, 1.0, 0.9), now=105.0)
    history.add(scrape(30, 5.0, 0.7), now=110.0)
    assert history.points[("train_loss", "trial-1 worker 0")] == [(5.0, 0.9), (10.0, 0.7)]
    assert history.points[("step_time_seconds", "trial-1 worker 0")] == [(10.0, 0.2)]  # (5 - 1) s over (30 - 10) steps
    assert history.points[("trials", "running")] == [(5.0, 2.0), (10.0, 2.0)]
    assert not any(series == "node_cpu_utilization" for series, _ in history.points)  # Ray's own series stay out

    page = tmp_path / monitor.PAGE
    monitor.write_page(page, history, "demo-run")
    text = page.read_text()
    assert '<meta http-equiv="refresh"' in text and "softprompt run demo-run" in text and "<script" not in text
    assert text.count("<svg") == len(monitor.CHARTS) and "no samples yet" in text  # tokens/s and eval have none yet
    monitor.write_page(page, history, "demo-run", final=True)
    assert "http-equiv" not in page.read_text()  # a finished run's page stops reloading


def test_the_driver_job_and_the_trials_carry_the_run_name(tiny_task: TinyTask, tmp_path: Path) -> None:
    from softprompt.ray import dashboard

    run_dir = tmp_path / "my-run"
    meta = dashboard.job_metadata(tiny_task.config(), run_dir, "ray-tune")
    assert meta[dashboard.JOB_NAME] == "my-run" and meta["softprompt_task"] == "tiny"
    assert meta["softprompt_run_dir"] == str(run_dir.resolve()) and '"task"' in meta["softprompt_config"]
    assert all(isinstance(v, str) for v in meta.values())  # Ray's job metadata takes strings only
    assert dashboard.job_config(tiny_task.config(), run_dir, "ray-tune").metadata == meta

    # A resumed sweep keeps the name it was registered under (Tune's restore checks it), even in a renamed folder.
    assert dashboard.sweep_label(run_dir, restoring=True) == dashboard.LEGACY_LABEL  # saved before sweeps were named
    assert dashboard.sweep_label(run_dir, restoring=False) == "my-run"
    moved = run_dir.rename(tmp_path / "renamed")
    assert dashboard.sweep_label(moved, restoring=True) == "my-run"
