"""QEMU migration streams: read them, write them, drive QEMU to produce them.

- :mod:`~snapfs.stream.format`: constants and small encoders of the version-3 stream format.
- :mod:`~snapfs.stream.reader`: the validating parser (``read_stream`` -> events).
- :mod:`~snapfs.stream.writer`: random-access stream layouts generated on the fly.
- :mod:`~snapfs.stream.vmstate`: ``VmstateView(reader)``, a snapshot as a stream.
- :mod:`~snapfs.stream.spool`: a whole stream read and validated into a page spool.
- :mod:`~snapfs.stream.ingest`: ``snapfs incoming --name`` (stream -> store).
- :mod:`~snapfs.stream.restore`: ``snapfs incoming --pid`` (stream -> live process).
- :mod:`~snapfs.stream.qmp`, :mod:`~snapfs.stream.qmp_snapshot`: ``snapfs snapshot --qmp``.
"""
