"""`llmtop serve` as an operator runs it: a real process, its options, its log, its signals, and
the live screen's --listen."""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

import loopback
from llmtop.simulator import SimBackend, Simulator

CONTRIB = Path(__file__).resolve().parent.parent / "contrib"


@pytest.fixture
def sim():
    simulator = Simulator([SimBackend("a", "vllm"), SimBackend("b", "vllm", fault="reset")])
    simulator.start_in_thread()
    yield simulator
    simulator.stop_thread()


@pytest.fixture
def config(tmp_path, sim) -> Path:
    path = tmp_path / "fleet.toml"
    path.write_text(
        "[settings]\ntimeout_s = 2\nhealth_interval_s = 0.5\n"
        + "".join(f'[[backend]]\nname = "{n}"\nprovider = "vllm"\nurl = "{sim.url(n)}"\nmodels = ["meta-llama/Llama-3.1-8B-Instruct"]\n' for n in "ab")
    )
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(*args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "llmtop", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})


def wait_ready(port: int, proc: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read()
        try:
            if loopback.get(f"http://127.0.0.1:{port}/readyz", timeout=1, trust_env=False).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise AssertionError("serve never became ready")


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_serve_answers_logs_each_event_on_one_line_and_stops_within_2s_of_sigterm(config, tmp_path, log_format):
    port = free_port()
    # Options before the command mean the same as after it.
    proc = start("--config", str(config), "serve", "--state", str(tmp_path / "s.json"), "--listen", f"127.0.0.1:{port}",
                 "--log-format", log_format)
    wait_ready(port, proc)
    assert loopback.get(f"http://127.0.0.1:{port}/backends/a/ready", trust_env=False).status_code == 200
    assert loopback.get(f"http://127.0.0.1:{port}/backends/b/ready", trust_env=False).status_code == 503
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=10)
    assert time.monotonic() - sent < 2.0 and proc.returncode == 0
    lines = err.strip().splitlines()
    assert len(lines) >= 3 and all("Traceback" not in line for line in lines)
    if log_format == "json":
        events = [json.loads(line) for line in lines]
        assert any(e["backend"] == "b" and e["kind"] == "status" and "down" in e["message"] for e in events)
    else:
        assert any(" b status: unknown -> down" in line for line in lines)
        assert lines[-1].endswith("serve: stopping (signal)")


def test_a_drain_from_the_cli_reaches_serve_within_a_second(config, tmp_path):
    port, state = free_port(), tmp_path / "s.json"
    proc = start("serve", "--config", str(config), "--state", str(state), "--listen", f"127.0.0.1:{port}")
    try:
        wait_ready(port, proc)
        assert subprocess.run([sys.executable, "-m", "llmtop", "drain", "a", "--config", str(config), "--state", str(state)],
                              capture_output=True, timeout=60).returncode == 0
        drained = time.monotonic()
        while loopback.get(f"http://127.0.0.1:{port}/backends/a/ready", trust_env=False).text != "draining\n":
            assert time.monotonic() - drained < 5, "the drain never reached serve"
            time.sleep(0.05)
        assert time.monotonic() - drained < 1.5  # the state file is followed every second
    finally:
        proc.terminate()
        proc.communicate(timeout=10)


def test_a_taken_port_and_a_bad_address_are_one_line_errors(config, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        proc = start("serve", "--config", str(config), "--state", str(tmp_path / "s.json"), "--listen", f"127.0.0.1:{port}")
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 2 and err.count("\n") == 1 and f"127.0.0.1:{port}" in err and "Traceback" not in err
    proc = start("serve", "--config", str(config), "--listen", "nowhere")
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 2 and "--listen" in err and "HOST:PORT" in err
    proc = start("--listen", "127.0.0.1:1", "check", "--config", str(config))  # given where check would ignore it
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 2 and "--listen applies to the live screen and `serve`" in err


def test_the_systemd_units_command_line_is_one_serve_accepts():
    from llmtop.cli import build_parser

    unit = (CONTRIB / "systemd" / "llmtop-serve.service").read_text()
    exec_start = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
    argv = exec_start.split("=", 1)[1].split()[1:]
    args = build_parser().parse_args(argv)
    assert args.command == "serve" and args.config == "/etc/llmtop/config.toml" and args.log_format == "text"


async def test_the_live_screen_serves_the_same_endpoints_and_its_d_drains_there(tmp_path, sim):
    from llmtop.config import BackendConfig, Config, Settings
    from llmtop.engine import Engine
    from llmtop.state import StateStore
    from llmtop.tui.app import LlmtopApp

    port = free_port()
    config = Config(settings=Settings(timeout_s=2, health_interval_s=0.5),
                    backends=(BackendConfig("a", "vllm", sim.url("a"), ("meta-llama/Llama-3.1-8B-Instruct",)),))
    app = LlmtopApp(Engine(config, StateStore(tmp_path / "s.json")), config_path=None, listen=f"127.0.0.1:{port}")
    async with app.run_test(size=(120, 40)) as pilot:
        async with loopback.AsyncClient(base_url=f"http://127.0.0.1:{port}", trust_env=False) as client:
            deadline = time.monotonic() + 30
            while (await client.get("/backends/a/ready")).status_code != 200:
                assert time.monotonic() < deadline
                await pilot.pause(0.05)
            await pilot.press("d", "y")
            while (r := await client.get("/backends/a/ready")).status_code != 503:
                assert time.monotonic() < deadline
                await pilot.pause(0.05)
            assert r.text == "draining\n"
        await pilot.press("q")


async def test_a_live_screen_without_listen_imports_no_server(tmp_path, monkeypatch):
    """The servers' modules bring aiohttp, whose import alone cost every start of the screen 0.2 s
    of CPU; without --listen or --agent-listen they are not imported at all (an import of either
    raises here)."""
    from llmtop.config import Config
    from llmtop.engine import Engine
    from llmtop.state import StateStore
    from llmtop.tui.app import LlmtopApp

    monkeypatch.setitem(sys.modules, "llmtop.serve.http", None)
    monkeypatch.setitem(sys.modules, "llmtop.serve.agent", None)
    app = LlmtopApp(Engine(Config(), StateStore(tmp_path / "s.json")), config_path=None)
    await app._start_serving()
    assert app._served == []


def test_a_stalled_nvml_call_does_not_hold_serve_past_2s_after_sigterm(config, tmp_path):
    """A GPU whose NVML calls hang (a wedged driver, a GPU off the bus): serve still stops within
    2 s of SIGTERM. The stand-in NVML module sleeps in every device count."""
    fake = tmp_path / "pynvml.py"
    fake.write_text(
        "import time\n"
        "class NVMLError(Exception):\n    value = 0\n"
        "NVML_ERROR_LIBRARY_NOT_FOUND = 12\nNVML_ERROR_DRIVER_NOT_LOADED = 9\nNVML_ERROR_GPU_IS_LOST = 15\n"
        "def nvmlInit(): pass\n"
        "def nvmlShutdown(): pass\n"
        f"def nvmlDeviceGetCount():\n    open({str(tmp_path / 'inside')!r}, 'w').close()\n    time.sleep(30)\n    return 0\n"
    )
    port = free_port()
    proc = start("serve", "--config", str(config), "--state", str(tmp_path / "s.json"), "--listen", f"127.0.0.1:{port}",
                 env={"PYTHONPATH": str(tmp_path)})
    wait_ready(port, proc)
    deadline = time.monotonic() + 30
    while not (tmp_path / "inside").exists():  # the GPU reader's thread is inside its 30 s call
        assert time.monotonic() < deadline
        time.sleep(0.05)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=40)
    assert time.monotonic() - sent < 2.0 and proc.returncode == 0


def _front_pid(proc: subprocess.Popen) -> int:
    """The readiness front's pid, from serve's first log line."""
    line = proc.stderr.readline()
    assert "readiness answered by process" in line, line
    return int(line.rsplit("process ", 1)[1].rstrip(")\n"))


def _serve_with_front(config, tmp_path, tmpdir: Path) -> tuple[subprocess.Popen, int, int]:
    """serve started and ready, with TMPDIR=tmpdir: its process, its port and its readiness front's pid."""
    port = free_port()
    proc = start("serve", "--config", str(config), "--state", str(tmp_path / "s.json"), "--listen", f"127.0.0.1:{port}",
                 env={"TMPDIR": str(tmpdir)})
    try:
        front = _front_pid(proc)
        wait_ready(port, proc)
    except BaseException:
        proc.kill()
        proc.communicate(timeout=10)
        raise
    return proc, port, front


def test_readiness_is_answered_by_a_process_of_its_own_while_serve_is_held(config, tmp_path):
    # The front answers balancers from the table serve sent it, whatever serve's own process is
    # doing (here: stopped outright); everything else is serve's, and waits for it.
    # A TMPDIR too long for a Unix socket's path (a CI runner's) still gets a front (runner._private_socket).
    long_tmp = tmp_path / ("long-" * 20)
    long_tmp.mkdir()
    proc, port, front = _serve_with_front(config, tmp_path, long_tmp)
    try:
        url = f"http://127.0.0.1:{port}"
        os.kill(proc.pid, signal.SIGSTOP)
        try:
            r = loopback.get(url + "/backends/a/ready", timeout=5, trust_env=False)
            assert (r.status_code, r.text) == (200, "ready\n")
            assert loopback.get(url + "/backends/b/ready", timeout=5, trust_env=False).status_code == 503
            with pytest.raises(httpx.ReadTimeout):  # serve's: it is stopped
                loopback.get(url + "/api/v1/fleet", timeout=httpx.Timeout(10.0, read=0.5), trust_env=False)
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        assert loopback.get(url + "/api/v1/fleet", timeout=10, trust_env=False).status_code == 200
        # A front that ends (killed, crashed) leaves serve answering on its port by itself.
        os.kill(front, signal.SIGKILL)
        while "the readiness front ended" not in (line := proc.stderr.readline()):
            assert line, "serve never said that its front ended"
        r = loopback.get(url + "/backends/a/ready", timeout=5, trust_env=False)
        assert (r.status_code, r.text) == (200, "ready\n")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        proc.kill()
        proc.communicate(timeout=10)


def test_once_prometheus_scrapes_the_front_answers_metrics_while_serve_is_held(config, tmp_path):
    # After a first scrape (serve's), serve sends the front a fresh body every second, and the
    # front answers scrapes itself: here, with serve's own process stopped outright.
    short_tmp = Path(tempfile.mkdtemp(prefix="lt-"))
    proc, port, _front = _serve_with_front(config, tmp_path, short_tmp)
    url = f"http://127.0.0.1:{port}/metrics"
    # One kept-alive connection, as Prometheus scrapes: its first scrape is serve's (relayed), the
    # later ones the front's.
    client = loopback.Client(trust_env=False, timeout=httpx.Timeout(10.0, read=1.0))
    try:
        assert "llmtop_backend_up{" in client.get(url, timeout=10).text  # serve's answer
        deadline = time.monotonic() + 30  # outer bound: the first body reaches the front within a second or two
        while True:
            time.sleep(1.5)  # serve running: it sends a body every second (who answers cannot be seen otherwise)
            os.kill(proc.pid, signal.SIGSTOP)
            try:
                r = client.get(url)
                break
            except httpx.ReadTimeout:  # no body at the front yet: the question went to the stopped serve
                assert time.monotonic() < deadline, "the front never answered /metrics"
            finally:
                os.kill(proc.pid, signal.SIGCONT)
        assert r.status_code == 200 and 'llmtop_backend_up{backend="a",provider="vllm"} 1.0' in r.text
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        client.close()
        proc.kill()
        proc.communicate(timeout=10)
        shutil.rmtree(short_tmp, ignore_errors=True)


def test_a_killed_serve_takes_its_front_and_port_with_it(config, tmp_path):
    short_tmp = Path(tempfile.mkdtemp(prefix="lt-"))  # tmp_path can be too long for the relay socket's path
    proc, port, front = _serve_with_front(config, tmp_path, short_tmp)
    ended = os.pidfd_open(front)  # readable once the front has ended (Linux; it is not our child)
    try:
        proc.kill()
        proc.communicate(timeout=10)
        # It goes as soon as it reads the end of serve's socket; 10 s is the outer bound only.
        assert select.select([ended], [], [], 10)[0], "the front outlived serve"
    finally:
        os.close(ended)
    try:
        assert list(short_tmp.iterdir()) == []  # the front removed the private folder of serve's relay socket
    finally:
        shutil.rmtree(short_tmp, ignore_errors=True)
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past TIME_WAIT, not past a listener
        s.bind(("127.0.0.1", port))  # nothing listens on serve's port any more
        s.listen(1)
