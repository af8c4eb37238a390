"""Every reference kernel, registered in `onnxbn.reference.kernels.table.KERNELS`.

Importing this package imports each kernel module, so every `@kernel`
decorator has run and the table is complete (a new module must be added here).
"""

from onnxbn.reference.kernels import (  # noqa: F401 (imported for registration)
    cast,
    conv,
    elementwise,
    logical,
    nn,
    normalization,
    padding,
    reduction,
    shape,
)
from onnxbn.reference.kernels.table import KERNELS, Kernel, kernel, select, supported_ops

__all__ = ["KERNELS", "Kernel", "kernel", "select", "supported_ops"]
