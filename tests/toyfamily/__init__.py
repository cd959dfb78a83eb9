"""A third, toy model family, written only here: the plug-in test's family.

``runtime`` is its run-time side (no PyTorch), ``torch_side`` its model and export plan;
importing them registers the family and its exporter, as the modules under
``nec_serve.families`` and ``nec_export.families`` do for the built-in families.
"""
