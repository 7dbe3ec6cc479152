"""Training tools: ``python -m train.prepare | train.explore | train.fit | train.compare | train.bench``.

Nothing here runs on import; every module's work happens in its ``main(argv)``.
"""
