"""On a machine with an NVIDIA GPU: what llmtop reads through NVML, set beside what nvidia-smi says.

    python benchmarks/real_gpu.py --out DIR

Starts one "GPU backend": a child process that takes GPU memory with PyTorch, keeps the GPU
busy, and serves a simulated vLLM backend on a loopback port, so the GPU process and the port
owner are one process, as with a real vLLM or llama.cpp server. Then it runs, against a config
that watches that backend:
- `llmtop check --json` and the table, and compares each GPU figure with `nvidia-smi --query-gpu`
  and each process with `nvidia-smi --query-compute-apps`, read right after;
- GpuReader.read() uncached, timed (NVML calls never run on the event loop, but their cost is
  the GPU thread's);
- `llmtop serve` and its `/metrics` GPU series;
- the live screen in a pseudo-terminal at 120x40, rendered with pyte, as text.
Everything goes to DIR (report.txt and the raw outputs). Needs torch and pyte; no assertions:
it prints what it saw, for a person (or a closing note) to read.
"""

from __future__ import annotations

import argparse
import json
import os
import pty
import select
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

GPU_BACKEND = r"""
import asyncio, sys, threading, torch
from llmtop.simulator import SimBackend, Simulator
taken = torch.empty(int(sys.argv[2]) * 1024 * 1024, dtype=torch.uint8, device="cuda")
a = torch.randn(4096, 4096, device="cuda")
stop = threading.Event()
def busy():
    while not stop.is_set():
        for _ in range(20):
            a @ a
        torch.cuda.synchronize()
        stop.wait(0.01)
threading.Thread(target=busy, daemon=True).start()
async def main():
    async with Simulator([SimBackend("gpu0-vllm", "vllm", ttft_ms=30)], port=int(sys.argv[1])) as sim:
        print(sim.url("gpu0-vllm"), flush=True)
        await asyncio.Event().wait()
asyncio.run(main())
"""

report: list[str] = []


def say(line: str = "") -> None:
    print(line, flush=True)
    report.append(line)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def smi(query: str, kind: str = "--query-gpu") -> list[list[str]]:
    out = subprocess.run(
        ["nvidia-smi", f"{kind}={query}", "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=30
    )
    return [[c.strip() for c in line.split(",")] for line in out.stdout.splitlines() if line.strip()]


def number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def compare(gpus: list[dict]) -> None:
    rows = smi("index,name,memory.used,memory.total,utilization.gpu,temperature.gpu,power.draw,power.limit")
    apps = smi("pid,process_name,used_memory", "--query-compute-apps")
    say("nvidia-smi, read right after:")
    for r in rows:
        say("  " + " | ".join(r))
    for a in apps:
        say("  app " + " | ".join(a))
    fields = [("memory_used_mib", 2), ("memory_total_mib", 3), ("utilization_pct", 4), ("temperature_c", 5),
              ("power_w", 6), ("power_limit_w", 7)]
    for g in gpus:
        row = next((r for r in rows if r[0] == str(g["index"])), None)
        if row is None:
            say(f"  gpu{g['index']}: not in nvidia-smi's list")
            continue
        say(f"gpu{g['index']} {g['name']!r} (nvidia-smi: {row[1]!r}); problem={g.get('problem')} unavailable={g.get('unavailable')}")
        for name, col in fields:
            ours, theirs = g.get(name), number(row[col])
            diff = "" if ours is None or theirs is None else f"  diff {ours - theirs:+.1f}"
            say(f"  {name:18} llmtop {ours!s:>10}  nvidia-smi {row[col]:>10}{diff}")
        smi_pids = {int(a[0]): a for a in apps if a[0].isdigit()}
        for p in g.get("processes", []):
            theirs = smi_pids.get(p["pid"])
            say(f"  process pid {p['pid']} {p['name'][:60]!r} {p['used_memory_mib']} MiB backend={p.get('backend')} "
                f"note={p.get('name_note')} | nvidia-smi: {theirs}")
        missing = set(smi_pids) - {p["pid"] for p in g.get("processes", [])}
        if missing:
            say(f"  nvidia-smi lists pids llmtop does not: {sorted(missing)}")


def llmtop(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmtop", *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def time_reads() -> None:
    from llmtop.gpu import GpuReader

    reader = GpuReader(cache_s=0.0)
    started = time.perf_counter()
    first = reader.read()
    first_s = time.perf_counter() - started
    times = []
    for _ in range(20):
        t = time.perf_counter()
        reader.read()
        times.append(time.perf_counter() - t)
    say(f"GpuReader.read(): first (with nvmlInit) {first_s * 1000:.1f} ms; then median {statistics.median(times) * 1000:.2f} ms, "
        f"max {max(times) * 1000:.2f} ms over 20; {len(first.gpus)} GPU(s), message={first.message!r}")
    reader.close()


def metrics(config: Path, out: Path) -> None:
    port = free_port()
    with tempfile.TemporaryDirectory() as state:
        proc = subprocess.Popen(
            [sys.executable, "-m", "llmtop", "serve", "--config", str(config), "--state", f"{state}/s.json",
             "--listen", f"127.0.0.1:{port}"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
                        if r.status == 200:
                            break
                except OSError:
                    time.sleep(0.2)
            time.sleep(2)  # one more GPU read after the first round
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
                page = r.read().decode()
            (out / "metrics.txt").write_text(page)
            say("serve /metrics, GPU series:")
            for line in page.splitlines():
                if line.startswith("llmtop_gpu"):
                    say("  " + line)
        except Exception as exc:  # noqa: BLE001 - a report, not a test
            say(f"serve: {exc!r}")
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                _, err = proc.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                _, err = proc.communicate()
            (out / "serve-stderr.txt").write_text(err)


def screen(config: Path, out: Path, size=(120, 40), seconds: float = 10.0) -> None:
    import pyte

    cols, rows = size
    vt = pyte.Screen(cols, rows)
    stream = pyte.ByteStream(vt)
    pid, fd = pty.fork()
    if pid == 0:
        os.environ.update(TERM="xterm-256color", COLUMNS=str(cols), LINES=str(rows))
        import fcntl, struct, termios

        fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        os.chdir(ROOT)
        os.execv(sys.executable, [sys.executable, "-m", "llmtop", "--config", str(config), "--state", str(out / "tui-state.json")])

    def pump(until: float) -> None:
        while time.monotonic() < until:
            ready, _, _ = select.select([fd], [], [], 0.1)
            if ready:
                try:
                    data = os.read(fd, 65536)
                except OSError:
                    return
                if not data:
                    return
                stream.feed(data)
                # answer the terminal queries Textual sends (cursor position, device attributes) as xterm would
                if b"\x1b[6n" in data:
                    os.write(fd, f"\x1b[{rows};{cols}R".encode())

    def dump(title: str) -> None:
        text = "\n".join(line.rstrip() for line in vt.display)
        (out / f"screen-{title}.txt").write_text(text)
        say(f"screen {cols}x{rows}, {title}:")
        for line in vt.display:
            say("  |" + line.rstrip())

    pump(time.monotonic() + seconds)
    dump("fleet")
    os.write(fd, b"\r")  # the backend's details
    pump(time.monotonic() + 3)
    dump("details")
    os.write(fd, b"\x1bq")
    pump(time.monotonic() + 3)
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    os.waitpid(pid, 0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--mib", type=int, default=3072, help="GPU memory the backend takes (default 3072)")
    args = parser.parse_args()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    say(subprocess.run(["nvidia-smi"], capture_output=True, text=True).stdout)
    time_reads()
    port = free_port()
    backend = subprocess.Popen([sys.executable, "-c", GPU_BACKEND, str(port), str(args.mib)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        url = backend.stdout.readline().strip()
        say(f"GPU backend pid {backend.pid} serves {url}, holds {args.mib} MiB")
        config = out / "llmtop.toml"
        config.write_text(
            f'[settings]\nhealth_interval_s = 1\nprobe_interval_s = 5\n\n[[backend]]\nname = "gpu0-vllm"\n'
            f'provider = "vllm"\nurl = "{url}"\nmodels = ["meta-llama/Llama-3.1-8B-Instruct"]\n'
        )
        time.sleep(3)  # the busy loop shows as utilization
        result = llmtop("check", "--config", str(config), "--state", str(out / "state.json"), "--json")
        (out / "check.json").write_text(result.stdout + result.stderr)
        say(f"llmtop check --json: exit {result.returncode}")
        try:
            document = json.loads(result.stdout)
            gpus = document.get("gpus") or document.get("gpu", {}).get("gpus", [])
            say(json.dumps(gpus, indent=1)[:4000])
            compare(gpus)
        except ValueError as exc:
            say(f"  not JSON: {exc}; stderr: {result.stderr[-2000:]}")
        table = llmtop("check", "--config", str(config), "--state", str(out / "state.json"))
        say(f"llmtop check (table): exit {table.returncode}")
        say(table.stdout + table.stderr)
        metrics(config, out)
        try:
            screen(config, out)
        except Exception as exc:  # noqa: BLE001
            say(f"screen: {exc!r}")
    finally:
        backend.kill()
        backend.wait()
        (out / "report.txt").write_text("\n".join(report) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
