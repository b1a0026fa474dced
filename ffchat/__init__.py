"""ffchat: fast local LLM chat on a single GPU."""

__version__ = "0.1.0"
