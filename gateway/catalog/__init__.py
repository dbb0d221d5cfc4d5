"""The sandbox catalog: records in Redis (record.py), the in-process cache (cache.py), reads
(reader.py), change notifications (invalidation.py), and the writer API for control planes.

Public surface for control planes::

    from gateway.catalog import CatalogWriter, SandboxRecord, access_link, connect
"""

from gateway.catalog.connection import connect
from gateway.catalog.record import RecordError, SandboxRecord, dump_record, parse_record
from gateway.catalog.writer import CatalogWriter, access_link

__all__ = ["CatalogWriter", "RecordError", "SandboxRecord", "access_link", "connect", "dump_record", "parse_record"]
