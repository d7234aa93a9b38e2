"""Old names that fedml 0.9.6's import chain needs, restored on newer images. Used only by gpu_check.sh.

The project pins what fedml 0.9.6 expects (setup.py: numpy<2, setuptools<81, Python 3.10/3.11 in CI), but
a GPU image may hold NumPy 2 and Python 3.12 with packages built against them, where swapping NumPy is
riskier than restoring two aliases. gpu_check.sh puts this folder on PYTHONPATH; on an image that has
the names, nothing here changes anything.
- wandb 0.13.2, which fedml imports at import time, reads ``np.float_`` and ``np.complex_`` at module
  level; NumPy 2 removed them. NumPy 1 defined them as exactly these types.
- wandb imports ``distutils``, which Python 3.12 removed; setuptools carries a copy and normally
  enables it through a .pth file, which an image may lack (and PYTHONPATH folders do not run).
"""
import numpy as _np

if not hasattr(_np, "float_"):
    _np.float_ = _np.float64
if not hasattr(_np, "complex_"):
    _np.complex_ = _np.complex128

try:
    import distutils  # noqa: F401
except ModuleNotFoundError:
    try:
        import _distutils_hack  # setuptools' own switch that maps `distutils` to setuptools._distutils

        _distutils_hack.add_shim()
    except ImportError:
        pass  # no setuptools either: the import check in gpu_check.sh names what is missing
