"""Does llama-server reuse a prompt's KV cache across its own slots? (Measured before building ``id_slot``.)

    .venv/bin/python bench/slot_cache_probe.py [--port 18931]

One SmolLM2 llama-server, 2 slots, one thread. Prompt A is sent pinned to slot 0, then
pinned to slot 1; then other prompts overwrite slot 0 and A comes back, pinned and not.
Each line prints ``(cache_n, prompt_n, prompt_ms, seconds)`` from the answer's timings.
The output of one run is in ``bench/results/slot_cache_probe.txt``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
import urllib.request
from typing import Any

from modelfleet.paths import cached_dev_model, cached_llama_server


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--port", type=int, default=18931)
    port = p.parse_args().port
    argv = [str(cached_llama_server()), "-m", str(cached_dev_model()), "--port", str(port), "--host", "127.0.0.1"]
    argv += ["-np", "2", "-c", "8192", "-t", "1", "--fit", "off", "--threads-http", "16"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

        def chat(msgs: list[dict[str, str]], slot: int | None = None) -> tuple[Any, ...]:
            body: dict[str, Any] = {"messages": msgs, "max_tokens": 4, "temperature": 0}
            if slot is not None:
                body["id_slot"] = slot
            req = urllib.request.Request(
                f"http://127.0.0.1:{port}/v1/chat/completions",
                json.dumps(body).encode(),
                {"Content-Type": "application/json"},
            )
            t0 = time.time()
            t = json.load(urllib.request.urlopen(req, timeout=600))["timings"]
            return t["cache_n"], t["prompt_n"], round(t["prompt_ms"]), round(time.time() - t0, 2)

        system = "You are a careful assistant. " + " ".join(
            f"Rule {i}: always answer politely and check facts number {i}." for i in range(40)
        )
        a = [{"role": "system", "content": system}, {"role": "user", "content": "hello A"}]
        b = [{"role": "system", "content": system}, {"role": "user", "content": "hello B"}]
        c = [
            {"role": "system", "content": "Different system prompt entirely. " * 30},
            {"role": "user", "content": "hi"},
        ]
        print("A slot0", chat(a, 0), flush=True)
        print("A again slot1 (other slot)", chat(a, 1), flush=True)
        print("B slot0 (shared system)", chat(b, 0), flush=True)
        print("C slot0 (overwrites slot0)", chat(c, 0), flush=True)
        print("A slot0 again after overwrite (prompt cache ram?)", chat(a, 0), flush=True)
        print("C no slot", chat(c), flush=True)
        print("A no slot", chat(a), flush=True)
    finally:
        proc.terminate()
        proc.wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
