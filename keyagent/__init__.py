"""The key agent (see docs/AGENT.md)."""
