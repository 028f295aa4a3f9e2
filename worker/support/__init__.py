"""What plugins share, one module per topic, so that no plugin imports another.

A plugin module (``worker/plugins/*.py``) is a leaf: it imports the base classes, ``shared``
and these modules, never another plugin. Code outside the plugins (the stages, the gpu pool,
compression, the benchmarks, the tests) uses these modules or the registry, never a plugin
module. The modules here import nothing from ``worker.plugins``: importing ``worker.plugins``
loads every plugin, and the plugins import these. The interface types they take and return
(``ConvertRequest`` and friends) are defined in ``plugin_io`` for that reason.

Heavy libraries (torch, transformers, tensorflow, onnxruntime) are imported inside functions.
"""
