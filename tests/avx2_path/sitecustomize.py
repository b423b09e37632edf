"""Run Python as on a CPU without AVX-512: put this folder on PYTHONPATH (see ``avx2_env`` in
tests/test_cpu_paths.py).

Two libraries choose a CPU code path by themselves:

* PyTorch's own kernels follow ``ATEN_CPU_CAPABILITY`` (set to ``avx2`` by ``avx2_env``, with
  ``MKL_ENABLE_INSTRUCTIONS`` and ``ONEDNN_MAX_CPU_ISA`` for the BLAS and oneDNN kernels); bitsandbytes
  reads the same capability (``torch.backends.cpu.get_cpu_capability()``) for its 8-bit matmul;
* bitsandbytes asks its native library whether the CPU has AVX-512-BF16
  (``lib.has_avx512bf16_cpu()``) while it is being imported: that answer picks its 4-bit inference
  kernel (weights repacked with bfloat16 scales) and makes it print a warning when the optional
  ``kernels`` package is missing. Here the answer is "no", as on an AVX2 laptop.

This file is imported at start-up by every Python process (and Jupyter kernel) that has the folder
on its path; it changes nothing until bitsandbytes is imported.
"""
import importlib.abc
import importlib.machinery
import sys


class _NoAvx512Bf16(importlib.abc.MetaPathFinder):
    """Wraps the loading of ``bitsandbytes.cextension`` so that its ``lib`` reports no AVX-512-BF16."""

    def find_spec(self, name, path, target=None):
        if name != "bitsandbytes.cextension":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        run_module = spec.loader.exec_module

        def exec_module(module):
            run_module(module)
            module.lib.has_avx512bf16_cpu = lambda: False

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _NoAvx512Bf16())
