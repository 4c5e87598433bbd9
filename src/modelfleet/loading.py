"""What a loading llama-server is doing, read from its log: the stage of the model load.

llama-server logs each step of its start (see the notes on llama-server): reading the
file and its metadata, fitting to memory, loading the tensors, building the context and
the KV cache, the warm-up run, the slots, and finally ``model loaded`` and ``listening
on``. :func:`stage` names the last step the log shows for the current run (the text
after the launcher's last ``--- modelfleet: starting`` line). It is a pure function of
the text; the log is read by the launcher.
"""

from __future__ import annotations

RUN_MARKER = "--- modelfleet: starting "

# (what the log line contains, the stage it starts), in the order llama-server goes through them.
STAGES: tuple[tuple[str, str], ...] = (
    ("llama_server: initializing", "initializing"),
    ("load_model: loading model", "opening the model file"),
    ("fitting params", "fitting to memory"),
    ("llama_model_loader: loaded meta data", "reading metadata"),
    ("load_tensors: loading model tensors", "loading tensors"),
    ("llama_context: constructing", "creating the context"),
    ("llama_kv_cache:", "allocating the KV cache"),
    ("warming up the model", "warming up"),
    ("load_model: initializing, n_slots", "preparing slots"),
    ("llama_server: model loaded", "model loaded"),
    ("listening on ", "listening"),
)


def stage(log_text: str) -> str | None:
    """The furthest loading stage the current run's log shows (None before the first)."""
    run = log_text.rsplit(RUN_MARKER, 1)[-1]
    found: str | None = None
    rank = -1
    for line in run.splitlines():
        for i, (needle, name) in enumerate(STAGES):
            if i > rank and needle in line:
                found, rank = name, i
    return found
