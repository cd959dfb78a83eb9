"""The PyTorch side of each model family, one module each (see :mod:`nec_export.plan`).

Every module here registers its family's exporter when :func:`nec_export.plan.exporter_for`
first runs; the runtime side of the same family is under :mod:`nec_serve.families`.
"""
