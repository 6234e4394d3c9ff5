"""The audit: models x attacks x metrics, recovery ratios, diagnostics and verdicts."""

from relapse.audit.recovery import finish, recovery_ratio, recovery_table, verdict

__all__ = ["finish", "recovery_ratio", "recovery_table", "verdict"]
