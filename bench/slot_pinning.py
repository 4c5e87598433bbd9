"""What a slot's reuse costs agents that share a long system prompt, on one llama-server.

    .venv/bin/python bench/slot_pinning.py [--system-tokens 600] [--out bench/results]

Three ways of choosing the slot, each on a fresh SmolLM2 server (1 thread, the RAM
prompt cache at its default), in three scenarios:

* ``server``: llama-server's defaults, no ``id_slot`` (what a least_busy pool gets);
* ``server, similarity 1``: ``--slot-prompt-similarity 1``, no ``id_slot``;
* ``pinned``: ``--slot-prompt-similarity 1`` and the slot ``affinity.SlotMap`` gives each
  request, sent as ``id_slot`` (what a server with ``pin_slots`` gets from the front door).

Scenarios: ``lone`` (one conversation, 4 turns, 2 slots), ``turns on one slot`` (two
agents alternating, A B A B A, on a 1-slot server) and ``three agents`` (A B C A B C, 2
slots). All share one system prompt; each turn adds a tool result of about 100 tokens.
Printed: the prompt tokens each turn evaluated (``timings.prompt_n``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from cache_routing import system_prompt, tool_result

from modelfleet import health
from modelfleet.affinity import SlotMap, route_key
from modelfleet.launcher import free_ports
from modelfleet.paths import cached_dev_model
from modelfleet.spec import find_llama_server

SCENARIOS = {"lone": ("AAAA", 2), "turns on one slot": ("ABABA", 1), "three agents": ("ABCABC", 2)}  # (turns, slots)
MODES = {"server": ([], False), "server, similarity 1": (["--slot-prompt-similarity", "1"], False)}
MODES["pinned"] = (["--slot-prompt-similarity", "1"], True)


def run(binary: Path, model: Path, extra: list[str], turns: str, slots: int, pin: bool, system: str) -> list[int]:
    """Prompt tokens each turn evaluated; with ``pin``, each request carries the slot a SlotMap gives it."""
    (port,) = free_ports(1)
    argv = [str(binary), "-m", str(model), "--port", str(port), "-np", str(slots), "-c", str(8192 * slots)]
    proc = subprocess.Popen([*argv, "-t", "1", *extra], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    slot_map = SlotMap(slots)
    try:
        url = f"http://127.0.0.1:{port}"
        health.wait_all([health.Waiter(f"llama-server on {port}", url + "/health", 120.0, proc.poll)])
        with httpx.Client(base_url=url, timeout=600) as c:
            rng = random.Random(1)
            history: dict[str, list[dict[str, str]]] = {}
            evaluated = []
            for name in turns:
                msgs = history.setdefault(name, [{"role": "system", "content": system}])
                msgs.append({"role": "user", "content": tool_result(ord(name), len(msgs), rng)})
                body: dict[str, object] = {"messages": msgs, "max_tokens": 8, "temperature": 0}
                slot = slot_map.take(route_key(body, pin=True)) if pin else None
                if slot is not None:
                    body["id_slot"] = slot
                answer = c.post("/v1/chat/completions", json=body).json()
                if slot is not None:
                    slot_map.release(slot)
                evaluated.append(int(answer["timings"]["prompt_n"]))
                msgs.append({"role": "assistant", "content": answer["choices"][0]["message"]["content"]})
            return evaluated
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--system-tokens", type=int, default=600)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = p.parse_args()
    binary, model = find_llama_server(), cached_dev_model()
    system = system_prompt(args.system_tokens, "pin")
    results: dict[str, dict[str, list[int]]] = {}
    for scenario, (turns, slots) in SCENARIOS.items():
        for mode, (extra, pin) in MODES.items():
            results.setdefault(scenario, {})[mode] = got = run(binary, model, extra, turns, slots, pin, system)
            print(f"{scenario} ({' '.join(turns)}), {mode}: {got}", file=sys.stderr, flush=True)
    command = "python bench/slot_pinning.py " + shlex.join(sys.argv[1:])
    lines = [
        "# Slot reuse for agents sharing a system prompt",
        "",
        f"Command: `{command}`",
        "",
        f"SmolLM2-135M, 1 thread, system prompt ~{args.system_tokens} tokens, ~100 new tokens a turn; "
        f"{os.cpu_count()} cores. Prompt tokens evaluated by each turn:",
        "",
        "| scenario | " + " | ".join(MODES) + " |",
        "|---|" + "---|" * len(MODES),
    ]
    for scenario, by_mode in results.items():
        turns, slots = SCENARIOS[scenario]
        cells = " | ".join(", ".join(map(str, v)) for v in by_mode.values())
        lines.append(f"| {scenario} ({' '.join(turns)}; {slots} slot{'s' * (slots > 1)}) | {cells} |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "slot_pinning.md").write_text("\n".join(lines) + "\n")
    (args.out / "slot_pinning.json").write_text(json.dumps({"command": command, "results": results}, indent=2) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
