"""The sandbox catalog: records in Redis (record.py), the in-process cache (cache.py), reads (reader.py)."""
