"""The sandbox catalog: records in Redis (record.py), the in-process cache (cache.py), reads
(reader.py), change notifications (invalidation.py), and the writer API for control planes.

Public surface for control planes::

    from gateway.catalog import CatalogWriter, SandboxRecord, connect
"""

from gateway.catalog.connection import connect
from gateway.catalog.record import RecordError, SandboxRecord, dump_record, parse_record
from gateway.catalog.writer import CatalogWriter

__all__ = ["CatalogWriter", "RecordError", "SandboxRecord", "connect", "dump_record", "parse_record"]
