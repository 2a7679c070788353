"""The access log, one module per concern.

``chain``: the records' encoding, the hash chain, seals (checkpoints), the
verifier key and how segments are read; ``writer``: the one writer of a log
(:class:`AuditLog`) and what a mount or the agent records through
(:class:`Auditor`); ``verify``: checking a log with the verifier key alone;
``commands``: the records of commands (written before they act, or handed
to the mount that holds the log); ``export``: the records for SIEM tools
(jsonl, CSV, CEF, ECS, OCSF) and following a live log; ``report``: the HTML
page an auditor reads; ``syslog``: forwarding to a syslog collector.
The layout of a log directory is in docs/AUDIT.md.

The names below are what most callers need; the rest is in its module
(``cryptfs.audit.verify.verify``, not re-exported: it would hide its module).
"""

from cryptfs.audit.chain import KEY_FILE, PUB_NAME, Checkpoint, canonical, parse_verifier, verifier_text
from cryptfs.audit.writer import AuditLog, Auditor, LogBusy, check_log, init_log

__all__ = ["KEY_FILE", "PUB_NAME", "AuditLog", "Auditor", "Checkpoint", "LogBusy", "canonical",
           "check_log", "init_log", "parse_verifier", "verifier_text"]
