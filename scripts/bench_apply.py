"""What `modelfleet apply` costs against a full restart, and whether clients notice it.

Starts a stack of four tiny llama-servers and the front door on free loopback ports,
keeps two client threads sending chat requests through the front door (one to a role
whose server is reloaded, one to a role that is kept), then changes one server's
context size and runs `modelfleet apply`; then does the same change with `stop --all`
and `start`. Prints wall times, restarted processes and failed requests.

    .venv/bin/python scripts/bench_apply.py
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from modelfleet.launcher import free_ports
from modelfleet.state import StateStore
from modelfleet.tinymodel import write_tiny_llama

MODELFLEET = str(Path(sys.executable).parent / "modelfleet")


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model = write_tiny_llama(folder / "tiny.gguf")
        api, *ports = free_ports(5)
        servers: dict[str, Any] = {
            f"s{i}": {"model": str(model), "port": p, "ctx_size": 256, "threads": 1, "roles": [f"r{i}"]}
            for i, p in enumerate(ports)
        }
        cfg = folder / "stack.yaml"
        state = folder / "state"
        env = os.environ | {"MODELFLEET_STATE_ROOT": str(folder / "root")}

        def cli(*args: str) -> float:
            t0 = time.monotonic()
            res = subprocess.run(
                [MODELFLEET, *args, "--config", str(cfg), "--state-dir", str(state)],
                capture_output=True,
                text=True,
                env=env,
            )
            if res.returncode != 0:
                raise SystemExit(f"{args} failed: {res.stderr}")
            return time.monotonic() - t0

        def pids() -> dict[str, int]:
            return {r.name: r.pid for r in StateStore(state).read().values()}

        def write(ctx: int) -> None:
            data = {"servers": {**servers, "s0": {**servers["s0"], "ctx_size": ctx}}, "api": {"port": api}}
            cfg.write_text(yaml.safe_dump(data))

        write(256)
        cli("start")
        door = f"http://127.0.0.1:{api}/v1/chat/completions"
        failures = {"r0": 0, "r1": 0}
        done = {"r0": 0, "r1": 0}
        stop = threading.Event()
        errors: list[str] = []

        def client(role: str) -> None:
            with httpx.Client(timeout=60) as c:
                while not stop.is_set():
                    body = {"model": role, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
                    try:
                        resp = c.post(door, json=body)
                        ok = resp.status_code == 200
                        if not ok:
                            errors.append(f"{role}: {resp.status_code} {resp.text[:160]}")
                    except httpx.HTTPError as exc:
                        ok = False
                        errors.append(f"{role}: {exc!r}")
                    done[role] += 1
                    failures[role] += 0 if ok else 1

        threads = [threading.Thread(target=client, args=(r,)) for r in failures]
        for t in threads:
            t.start()
        time.sleep(1.0)
        before = pids()
        write(512)
        apply_s = cli("apply")
        after = pids()
        time.sleep(1.0)
        stop.set()
        for t in threads:
            t.join()
        restarted = sorted(n for n in before if after.get(n) != before[n])
        print(f"apply: {apply_s:.2f} s, restarted {restarted} of {len(before)} processes")
        print(f"  requests during the run: {done}, failed: {failures}")
        for line in errors[:5]:
            print(f"  {line}")

        write(1024)
        t0 = time.monotonic()
        cli("stop", "--all")
        cli("start")
        full_s = time.monotonic() - t0
        print(f"stop --all + start: {full_s:.2f} s, restarted all {len(pids())} processes")
        cli("stop", "--all")


if __name__ == "__main__":
    main()
