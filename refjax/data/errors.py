"""Errors for bad input records: they always name the record and the field."""

from __future__ import annotations


class BadRecordError(ValueError):
    """A record that cannot be used; names the record id and the offending field."""

    def __init__(self, record_id: str, field: str, reason: str):
        self.record_id = record_id
        self.field = field
        self.reason = reason
        super().__init__(f"bad record {record_id!r}, field {field!r}: {reason}")
