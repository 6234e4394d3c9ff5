"""Audit: coming in later issues (see the tracker)."""
