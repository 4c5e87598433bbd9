"""modelfleet: run a stack of llama-server processes and auxiliary services as one managed fleet."""

__version__ = "0.1.0"
